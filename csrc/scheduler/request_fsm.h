// Request lifecycle as a finite-state machine over a std::variant of states.
//
//   Waiting --Admit--> Prefilling --PrefillDone--> Decoding
//                       |    ^                       |
//                    Retract |Admit               Retract
//                       v    |                       v
//                       Retracted <------------------+
//   any of Waiting/Prefilling/Decoding/Retracted --Finish--> Finished
//
// Each legal transition is an overload `Next on(State&&, Event&&)` that consumes the
// source state and returns the next one; `fire` dispatches a runtime (state, event)
// pair to them and throws IllegalTransition naming both when no overload exists.
// Resources live only in the states that may hold them: the Resident (slot + pages)
// exists in Prefilling and Decoding; Waiting, Retracted and Finished have no field that
// could hold a page, so `finished.res` or `pages_of(finished)` does not compile.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "block_pool.h"
#include "slot_pool.h"
#include "token_seq.h"

namespace tokenspeed::sched {

// A request's footprint on the GPU: its block-table slot and its KV pages, in order.
class Resident {
 public:
  explicit Resident(SlotHandle slot) : slot_(std::move(slot)) {}
  Resident(Resident&&) noexcept = default;
  Resident& operator=(Resident&& other) noexcept {
    if (this != &other) {
      release_pages();
      slot_ = std::move(other.slot_);
      pages_ = std::exchange(other.pages_, {});
      sched = other.sched;
      cached_pages = other.cached_pages;
    }
    return *this;
  }
  Resident(const Resident&) = delete;
  Resident& operator=(const Resident&) = delete;
  // Pages go back last page first (a cached child reaches the LRU before its parent),
  // then the slot (which clears the block-table row).
  ~Resident() { release_pages(); }

  int32_t slot() const { return slot_.slot(); }
  const std::vector<PageHandle>& pages() const { return pages_; }
  int32_t num_pages() const { return static_cast<int32_t>(pages_.size()); }

  // Appends a page and writes it into the block-table row.
  void push_page(PageHandle page) {
    slot_.write_page(num_pages(), page.page());
    pages_.push_back(std::move(page));
  }
  // Swaps page `index` for another (a private page for the cached copy of the same
  // tokens); the old handle is dropped here.
  void replace_page(int32_t index, PageHandle page) {
    slot_.write_page(index, page.page());
    pages_[index] = std::move(page);
  }

  // Tokens whose KV is written or scheduled to be written by a plan already issued
  // (in-flight steps included). Positions of the next step start here.
  int32_t sched = 0;
  // Leading pages shared from the prefix cache when the request was admitted.
  int32_t cached_pages = 0;

 private:
  void release_pages() noexcept {
    while (!pages_.empty()) pages_.pop_back();
  }

  SlotHandle slot_;
  std::vector<PageHandle> pages_;
};

enum class FinishReason : uint8_t { kStop, kLength, kAbort };
std::string_view finish_reason_name(FinishReason reason);

struct Waiting {
  static constexpr std::string_view kName = "Waiting";
  TokenSeq seq;
};
struct Prefilling {
  static constexpr std::string_view kName = "Prefilling";
  TokenSeq seq;
  Resident res;
};
struct Decoding {
  static constexpr std::string_view kName = "Decoding";
  TokenSeq seq;
  Resident res;
};
struct Retracted {  // pages freed, tokens kept: re-enters the waiting queue and recomputes
  static constexpr std::string_view kName = "Retracted";
  TokenSeq seq;
};
struct Finished {
  static constexpr std::string_view kName = "Finished";
  TokenSeq seq;
  FinishReason reason;
};

using RequestState = std::variant<Waiting, Prefilling, Decoding, Retracted, Finished>;

struct EvAdmit {  // got a slot and the pages of its first chunk (cache hits included)
  static constexpr std::string_view kName = "Admit";
  Resident res;
};
struct EvPrefillDone {  // the chunk reaching the last known token was scheduled
  static constexpr std::string_view kName = "PrefillDone";
};
struct EvRetract {  // pages ran out: give everything back, keep the tokens
  static constexpr std::string_view kName = "Retract";
};
struct EvFinish {
  static constexpr std::string_view kName = "Finish";
  FinishReason reason;
};

using Event = std::variant<EvAdmit, EvPrefillDone, EvRetract, EvFinish>;

// The legal transitions. Each consumes its source state.
Prefilling on(Waiting&& s, EvAdmit&& e);
Prefilling on(Retracted&& s, EvAdmit&& e);
Decoding on(Prefilling&& s, EvPrefillDone&& e);
Retracted on(Prefilling&& s, EvRetract&& e);
Retracted on(Decoding&& s, EvRetract&& e);
Finished on(Waiting&& s, EvFinish&& e);
Finished on(Prefilling&& s, EvFinish&& e);
Finished on(Decoding&& s, EvFinish&& e);
Finished on(Retracted&& s, EvFinish&& e);

// Applies `event` to `state`; throws IllegalTransition("request <id>: event 'X' is
// illegal in state 'Y'") when no transition exists.
RequestState fire(int64_t request_id, RequestState&& state, Event&& event);

std::string_view state_name(const RequestState& state);
std::string_view event_name(const Event& event);

// Only states that hold pages have this accessor.
inline const std::vector<PageHandle>& pages_of(const Prefilling& s) { return s.res.pages(); }
inline const std::vector<PageHandle>& pages_of(const Decoding& s) { return s.res.pages(); }

inline Resident* resident_of(RequestState& state) {
  if (auto* p = std::get_if<Prefilling>(&state)) return &p->res;
  if (auto* d = std::get_if<Decoding>(&state)) return &d->res;
  return nullptr;
}
inline const Resident* resident_of(const RequestState& state) {
  return resident_of(const_cast<RequestState&>(state));
}
inline const TokenSeq& seq_of(const RequestState& state) {
  return std::visit([](const auto& s) -> const TokenSeq& { return s.seq; }, state);
}
inline TokenSeq& seq_of(RequestState& state) {
  return std::visit([](auto& s) -> TokenSeq& { return s.seq; }, state);
}

// Test hook: builds a throwaway request in `state` ("Waiting", ...), fires `event`
// ("Admit", "PrefillDone", "Retract", "Finish") and returns the resulting state's name.
// Throws IllegalTransition for illegal pairs, InvalidArgument for unknown names.
std::string probe_transition(std::string_view state, std::string_view event);

}  // namespace tokenspeed::sched
