#include "request_fsm.h"

#include <optional>

#include "errors.h"

namespace tokenspeed::sched {

std::string_view finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
  }
  return "?";
}

Prefilling on(Waiting&& s, EvAdmit&& e) { return Prefilling{std::move(s.seq), std::move(e.res)}; }
Prefilling on(Retracted&& s, EvAdmit&& e) { return Prefilling{std::move(s.seq), std::move(e.res)}; }
Decoding on(Prefilling&& s, EvPrefillDone&&) { return Decoding{std::move(s.seq), std::move(s.res)}; }

// Moving the Resident into a local makes the pages and slot go back right here, inside
// the transition, rather than whenever the moved-from source state dies.
Retracted on(Prefilling&& s, EvRetract&&) {
  Resident gone = std::move(s.res);
  return Retracted{std::move(s.seq)};
}
Retracted on(Decoding&& s, EvRetract&&) {
  Resident gone = std::move(s.res);
  return Retracted{std::move(s.seq)};
}
Finished on(Waiting&& s, EvFinish&& e) { return Finished{std::move(s.seq), e.reason}; }
Finished on(Retracted&& s, EvFinish&& e) { return Finished{std::move(s.seq), e.reason}; }
Finished on(Prefilling&& s, EvFinish&& e) {
  Resident gone = std::move(s.res);
  return Finished{std::move(s.seq), e.reason};
}
Finished on(Decoding&& s, EvFinish&& e) {
  Resident gone = std::move(s.res);
  return Finished{std::move(s.seq), e.reason};
}

RequestState fire(int64_t request_id, RequestState&& state, Event&& event) {
  return std::visit(
      [request_id](auto&& s, auto&& e) -> RequestState {
        using S = std::decay_t<decltype(s)>;
        using E = std::decay_t<decltype(e)>;
        if constexpr (requires { on(std::declval<S&&>(), std::declval<E&&>()); }) {
          return on(std::move(s), std::move(e));
        } else {
          throw IllegalTransition(request_id, S::kName, E::kName);
        }
      },
      std::move(state), std::move(event));
}

std::string_view state_name(const RequestState& state) {
  return std::visit([](const auto& s) { return std::decay_t<decltype(s)>::kName; }, state);
}
std::string_view event_name(const Event& event) {
  return std::visit([](const auto& e) { return std::decay_t<decltype(e)>::kName; }, event);
}

std::string probe_transition(std::string_view state_str, std::string_view event_str) {
  BlockPool pool(4);
  SlotPool slots(2, 4);
  auto resident = [&] {
    Resident res(*slots.acquire());
    res.push_page(*pool.allocate());
    return res;
  };
  TokenSeq seq({1, 2, 3}, 4, 2, true);
  RequestState state = Waiting{seq};
  if (state_str == "Waiting") state = Waiting{seq};
  else if (state_str == "Prefilling") state = Prefilling{seq, resident()};
  else if (state_str == "Decoding") state = Decoding{seq, resident()};
  else if (state_str == "Retracted") state = Retracted{seq};
  else if (state_str == "Finished") state = Finished{seq, FinishReason::kStop};
  else throw InvalidArgument("probe_transition: unknown state '" + std::string(state_str) + "'");

  std::optional<Event> event;
  if (event_str == "Admit") event.emplace(EvAdmit{resident()});
  else if (event_str == "PrefillDone") event.emplace(EvPrefillDone{});
  else if (event_str == "Retract") event.emplace(EvRetract{});
  else if (event_str == "Finish") event.emplace(EvFinish{FinishReason::kStop});
  else throw InvalidArgument("probe_transition: unknown event '" + std::string(event_str) + "'");

  RequestState next = fire(-1, std::move(state), std::move(*event));
  if (pool.num_used() != (resident_of(next) ? resident_of(next)->num_pages() : 0)) {
    throw SchedulerError("probe_transition: pages leaked by the transition");
  }
  return std::string(state_name(next));
}

}  // namespace tokenspeed::sched
