// Request FSM: the transition table, consumption of the source state, resources.
#include <string>
#include <type_traits>

#include "errors.h"
#include "harness.h"
#include "request_fsm.h"

using namespace tokenspeed::sched;

// States without pages have no way to reach one.
template <class S>
concept HasPages = requires(const S& s) { pages_of(s); };
static_assert(HasPages<Prefilling> && HasPages<Decoding>);
static_assert(!HasPages<Waiting> && !HasPages<Retracted> && !HasPages<Finished>);
template <class S>
concept HasResident = requires(S& s) { s.res; };
static_assert(!HasResident<Finished> && !HasResident<Waiting> && !HasResident<Retracted>);
// Transitions consume their source: they take rvalues only.
static_assert(!std::is_invocable_v<Decoding (*)(Prefilling&&, EvPrefillDone&&), Prefilling&, EvPrefillDone>);

TEST_CASE(transition_table_is_exactly_the_documented_one) {
  const char* states[] = {"Waiting", "Prefilling", "Decoding", "Retracted", "Finished"};
  const char* events[] = {"Admit", "PrefillDone", "Retract", "Finish"};
  int legal = 0;
  for (const char* s : states) {
    for (const char* e : events) {
      try {
        const std::string next = probe_transition(s, e);
        ++legal;
        const std::string ev = e;
        if (ev == "Admit") CHECK_EQ(next, std::string("Prefilling"));
        if (ev == "PrefillDone") CHECK_EQ(next, std::string("Decoding"));
        if (ev == "Retract") CHECK_EQ(next, std::string("Retracted"));
        if (ev == "Finish") CHECK_EQ(next, std::string("Finished"));
      } catch (const IllegalTransition& err) {
        const std::string msg = err.what();
        CHECK(msg.find(std::string("'") + s + "'") != std::string::npos);
        CHECK(msg.find(std::string("'") + e + "'") != std::string::npos);
      }
    }
  }
  CHECK_EQ(legal, 9);
}

TEST_CASE(illegal_event_names_request_state_and_event) {
  TokenSeq seq({1}, 1, 4, false);
  CHECK_THROWS(fire(17, Finished{seq, FinishReason::kStop}, EvRetract{}), IllegalTransition,
               "request 17: event 'Retract' is illegal in state 'Finished'");
  CHECK_THROWS(fire(3, Waiting{seq}, EvPrefillDone{}), IllegalTransition,
               "event 'PrefillDone' is illegal in state 'Waiting'");
}

TEST_CASE(finishing_returns_pages_and_slot_inside_the_transition) {
  BlockPool pool(8);
  SlotPool slots(1, 4);
  Resident res(*slots.acquire());
  res.push_page(*pool.allocate());
  res.push_page(*pool.allocate());
  Prefilling p{TokenSeq({1, 2, 3}, 2, 2, false), std::move(res)};
  CHECK_EQ(pages_of(p).size(), 2u);
  CHECK_EQ(slots.table()[1], 2);
  Decoding d = on(std::move(p), EvPrefillDone{});
  CHECK_EQ(pages_of(d).size(), 2u);
  CHECK_EQ(pool.num_used(), 2);
  Finished f = on(std::move(d), EvFinish{FinishReason::kLength});
  CHECK_EQ(pool.num_used(), 0);  // gone before `d` itself is destroyed
  CHECK_EQ(slots.num_free(), 1);
  CHECK_EQ(slots.table()[0], 0);
  CHECK_EQ(f.seq.size(), 3);
  CHECK(f.reason == FinishReason::kLength);
  pool.check_invariants();
}

TEST_CASE(retraction_keeps_tokens_and_drops_resources) {
  BlockPool pool(4);
  SlotPool slots(1, 4);
  Resident res(*slots.acquire());
  res.push_page(*pool.allocate());
  RequestState s = Decoding{TokenSeq({4, 5}, 3, 2, false), std::move(res)};
  s = fire(1, std::move(s), EvRetract{});
  CHECK_EQ(std::string(state_name(s)), std::string("Retracted"));
  CHECK(resident_of(s) == nullptr);
  CHECK(seq_of(s).tokens() == (std::vector<int32_t>{4, 5}));
  CHECK_EQ(pool.num_free(), 3);
  Resident again(*slots.acquire());
  s = fire(1, std::move(s), EvAdmit{std::move(again)});
  CHECK_EQ(std::string(state_name(s)), std::string("Prefilling"));
}

TEST_CASE(resident_releases_last_page_first) {
  BlockPool pool(4);
  SlotPool slots(1, 4);
  {
    Resident res(*slots.acquire());
    for (int i = 0; i < 3; ++i) {
      res.push_page(*pool.allocate());
      pool.mark_cached(res.pages().back().page());
    }
  }
  CHECK(pool.lru_order() == (std::vector<int32_t>{3, 2, 1}));
}
