// pybind11 binding: tokenspeed_engine._scheduler. The only file of the scheduler that
// includes Python headers. Errors cross as Python exceptions: InvalidArgument ->
// ValueError, SchedulerError -> RuntimeError, IllegalTransition -> IllegalTransitionError
// (a RuntimeError subclass).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "scheduler.h"

namespace py = pybind11;
using namespace tokenspeed::sched;

namespace {

// A plan plus the Python scheduler object it came from (its block table lives there).
struct BoundPlan {
  Plan plan;
  py::object scheduler;
};

template <class T>
py::array_t<T> view_of(const std::vector<T>& v, py::handle owner) {
  return py::array_t<T>({static_cast<py::ssize_t>(v.size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        v.data(), owner);
}

py::array_t<int32_t> block_table_view(const Scheduler& s, py::handle owner) {
  py::array_t<int32_t> a({static_cast<py::ssize_t>(s.block_table_rows()), static_cast<py::ssize_t>(s.block_table_cols())},
                         {static_cast<py::ssize_t>(s.block_table_cols() * sizeof(int32_t)),
                          static_cast<py::ssize_t>(sizeof(int32_t))},
                         s.block_table(), owner);
  // Read-only: writing through the view would corrupt the scheduler's state.
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}

int32_t checked_token(int64_t t, const char* what) {
  if (t < 0 || t > std::numeric_limits<int32_t>::max()) {
    throw InvalidArgument(std::string(what) + ": token id " + std::to_string(t) + " is outside [0, 2^31)");
  }
  return static_cast<int32_t>(t);
}

std::vector<int32_t> to_token_ids(const py::handle& obj, const char* what) {
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {  // no numpy round trip
    auto seq = py::reinterpret_borrow<py::sequence>(obj);
    std::vector<int32_t> out;
    out.reserve(seq.size());
    for (py::handle h : seq) out.push_back(checked_token(h.cast<int64_t>(), what));
    return out;
  }
  auto arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!arr || arr.ndim() != 1) throw InvalidArgument(std::string(what) + ": expected a 1-D sequence of token ids");
  std::vector<int32_t> out(static_cast<size_t>(arr.size()));
  const int64_t* d = arr.data();
  for (size_t i = 0; i < out.size(); ++i) out[i] = checked_token(d[i], what);
  return out;
}

std::vector<int64_t> to_ids(const py::handle& obj) {
  std::vector<int64_t> out;
  if (obj.is_none()) return out;
  for (py::handle h : obj) out.push_back(h.cast<int64_t>());
  return out;
}

py::list finished_to_py(const std::vector<FinishedRequest>& done) {
  py::list out;
  for (const auto& f : done) out.append(py::make_tuple(f.request_id, f.reason));
  return out;
}

}  // namespace

PYBIND11_MODULE(_scheduler, m) {
  m.doc() = "TokenSpeed C++ scheduler: request FSM, paged KV pool, prefix cache, batch planner.";
  py::register_exception<IllegalTransition>(m, "IllegalTransitionError", PyExc_RuntimeError);
  m.attr("NULL_PAGE") = kNullPage;
  m.attr("MAX_INFLIGHT_PLANS") = Scheduler::kMaxInflightPlans;

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init([](int32_t num_pages, int32_t page_size, int32_t max_num_batched_tokens,
                       int32_t max_running_requests, int32_t decode_width, bool enable_prefix_cache,
                       int32_t max_context_len) {
             SchedulerConfig c{num_pages, page_size, max_num_batched_tokens, max_running_requests,
                               decode_width, enable_prefix_cache, max_context_len};
             c.validate();
             return c;
           }),
           py::kw_only(), py::arg("num_pages") = 1024, py::arg("page_size") = 16,
           py::arg("max_num_batched_tokens") = 8192, py::arg("max_running_requests") = 256,
           py::arg("decode_width") = 1, py::arg("enable_prefix_cache") = true,
           py::arg("max_context_len") = 65536)
      .def_readonly("num_pages", &SchedulerConfig::num_pages)
      .def_readonly("page_size", &SchedulerConfig::page_size)
      .def_readonly("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readonly("max_running_requests", &SchedulerConfig::max_running_requests)
      .def_readonly("decode_width", &SchedulerConfig::decode_width)
      .def_readonly("enable_prefix_cache", &SchedulerConfig::enable_prefix_cache)
      .def_readonly("max_context_len", &SchedulerConfig::max_context_len)
      .def_property_readonly("max_pages_per_req", &SchedulerConfig::max_pages_per_req);

  py::class_<Stats>(m, "Stats")
      .def_readonly("pages_total", &Stats::pages_total)
      .def_readonly("pages_free", &Stats::pages_free)
      .def_readonly("pages_used", &Stats::pages_used)
      .def_readonly("pages_cached", &Stats::pages_cached)
      .def_readonly("num_waiting", &Stats::num_waiting)
      .def_readonly("num_running", &Stats::num_running)
      .def_readonly("num_inflight_plans", &Stats::num_inflight_plans)
      .def_readonly("prefix_hit_tokens", &Stats::prefix_hit_tokens)
      .def_readonly("prefix_lookup_tokens", &Stats::prefix_lookup_tokens)
      .def_readonly("num_retractions", &Stats::num_retractions)
      .def_readonly("num_finished", &Stats::num_finished)
      .def_readonly("num_steps", &Stats::num_steps)
      .def("as_dict", [](const Stats& s) {
        py::dict d;
        d["pages_total"] = s.pages_total; d["pages_free"] = s.pages_free;
        d["pages_used"] = s.pages_used; d["pages_cached"] = s.pages_cached;
        d["num_waiting"] = s.num_waiting; d["num_running"] = s.num_running;
        d["num_inflight_plans"] = s.num_inflight_plans;
        d["prefix_hit_tokens"] = s.prefix_hit_tokens; d["prefix_lookup_tokens"] = s.prefix_lookup_tokens;
        d["num_retractions"] = s.num_retractions; d["num_finished"] = s.num_finished;
        d["num_steps"] = s.num_steps;
        return d;
      })
      .def("__repr__", [](const Stats& s) {
        return "Stats(pages used/free/cached/total=" + std::to_string(s.pages_used) + "/" +
               std::to_string(s.pages_free) + "/" + std::to_string(s.pages_cached) + "/" +
               std::to_string(s.pages_total) + ", running=" + std::to_string(s.num_running) +
               ", waiting=" + std::to_string(s.num_waiting) +
               ", prefix_hit_tokens=" + std::to_string(s.prefix_hit_tokens) + ")";
      });

  py::class_<BoundPlan>(m, "Plan")
      .def_property_readonly("step", [](const BoundPlan& b) { return b.plan.step; })
      .def_property_readonly("num_requests", [](const BoundPlan& b) { return b.plan.num_requests(); })
      .def_property_readonly("num_tokens", [](const BoundPlan& b) { return b.plan.num_tokens(); })
      .def("__len__", [](const BoundPlan& b) { return b.plan.num_requests(); })
#define TS_PLAN_ARRAY(name) \
  .def_property_readonly(#name, [](py::object self) { return view_of(self.cast<const BoundPlan&>().plan.name, self); })
      TS_PLAN_ARRAY(request_ids) TS_PLAN_ARRAY(slots) TS_PLAN_ARRAY(prefix_lens)
      TS_PLAN_ARRAY(extend_lens) TS_PLAN_ARRAY(sample) TS_PLAN_ARRAY(input_ids) TS_PLAN_ARRAY(positions)
#undef TS_PLAN_ARRAY
      .def_property_readonly("block_table", [](const BoundPlan& b) {
        return block_table_view(b.scheduler.cast<const Scheduler&>(), b.scheduler);
      });

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def_property_readonly("config", &Scheduler::config)
      .def(
          "submit",
          [](Scheduler& s, int64_t request_id, py::handle tokens, int32_t max_new_tokens) {
            s.submit(request_id, to_token_ids(tokens, "submit"), max_new_tokens);
          },
          py::arg("request_id"), py::arg("tokens"), py::arg("max_new_tokens"))
      .def("next_plan", [](py::object self) { return BoundPlan{self.cast<Scheduler&>().next_plan(), self}; })
      .def(
          "advance",
          [](Scheduler& s, py::handle events, py::handle finished, py::handle aborted) {
            std::vector<int64_t> ids;
            std::vector<int32_t> counts, tokens;
            py::iterable items = py::isinstance<py::dict>(events)
                                     ? py::iterable(events.cast<py::dict>().attr("items")())
                                     : py::iterable(py::reinterpret_borrow<py::object>(events));
            for (py::handle item : items) {
              auto pair = item.cast<py::sequence>();
              if (pair.size() != 2) throw InvalidArgument("advance: events are (request_id, tokens) pairs");
              ids.push_back(pair[0].cast<int64_t>());
              std::vector<int32_t> t = to_token_ids(pair[1], "advance");
              counts.push_back(static_cast<int32_t>(t.size()));
              tokens.insert(tokens.end(), t.begin(), t.end());
            }
            const auto fin = to_ids(finished), ab = to_ids(aborted);
            return finished_to_py(s.advance(StepEvents{ids, counts, tokens, fin, ab}));
          },
          py::arg("events"), py::arg("finished") = py::tuple(), py::arg("aborted") = py::tuple(),
          "Report the oldest plan in flight: events = [(request_id, [tokens...]), ...] or a dict. "
          "Returns [(request_id, reason), ...] of requests that finished.")
      .def(
          "advance_arrays",
          [](Scheduler& s, py::array_t<int64_t, py::array::c_style | py::array::forcecast> ids,
             py::array_t<int32_t, py::array::c_style | py::array::forcecast> counts,
             py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens, py::handle finished,
             py::handle aborted) {
            const auto fin = to_ids(finished), ab = to_ids(aborted);
            StepEvents ev{{ids.data(), static_cast<size_t>(ids.size())},
                          {counts.data(), static_cast<size_t>(counts.size())},
                          {tokens.data(), static_cast<size_t>(tokens.size())}, fin, ab};
            return finished_to_py(s.advance(ev));
          },
          py::arg("request_ids"), py::arg("num_tokens"), py::arg("tokens"), py::arg("finished") = py::none(),
          py::arg("aborted") = py::none(),
          "Fast advance: num_tokens[i] of the concatenated `tokens` belong to request_ids[i].")
      .def("abort", &Scheduler::abort, py::arg("request_id"))
      .def("stats", &Scheduler::stats)
      .def("check_invariants", &Scheduler::check_invariants)
      .def("has_request", &Scheduler::has_request, py::arg("request_id"))
      .def(
          "request_info",
          [](const Scheduler& s, int64_t request_id) {
            RequestInfo i = s.request_info(request_id);
            py::dict d;
            d["request_id"] = i.request_id; d["state"] = i.state; d["tokens"] = i.tokens;
            d["prompt_len"] = i.prompt_len; d["max_new_tokens"] = i.max_new_tokens;
            d["pending_steps"] = i.pending_steps; d["slot"] = i.slot; d["sched"] = i.sched;
            d["cached_pages"] = i.cached_pages; d["pages"] = i.pages;
            return d;
          },
          py::arg("request_id"))
      .def("cached_page_tokens", &Scheduler::cached_page_tokens, py::arg("page"))
      .def_property_readonly("block_table", [](py::object self) {
        return block_table_view(self.cast<const Scheduler&>(), self);
      });

  m.def("_fsm_probe", &probe_transition, py::arg("state"), py::arg("event"),
        "Test hook: fire `event` on a throwaway request in `state`; returns the next state's name.");
}
