// Scheduler: planning scenarios and a randomized stress run with full invariant checks.
#include <deque>
#include <random>
#include <string>
#include <vector>

#include "errors.h"
#include "harness.h"
#include "scheduler.h"

using namespace tokenspeed::sched;

namespace {

SchedulerConfig small_config() {
  SchedulerConfig c;
  c.num_pages = 64;
  c.page_size = 4;
  c.max_num_batched_tokens = 64;
  c.max_running_requests = 8;
  c.max_context_len = 256;
  return c;
}

// Reports `token` for every token-producing entry of the oldest plan in flight.
std::vector<FinishedRequest> advance_all(Scheduler& s, const Plan& plan, int32_t token) {
  std::vector<int64_t> ids;
  for (int32_t i = 0; i < plan.num_requests(); ++i) {
    if (plan.sample[i]) ids.push_back(plan.request_ids[i]);
  }
  std::vector<int32_t> counts(ids.size(), 1), tokens(ids.size(), token);
  return s.advance(StepEvents{ids, counts, tokens, {}, {}});
}

void run_until_gone(Scheduler& s, int64_t id, int32_t token) {
  for (int guard = 0; s.has_request(id); ++guard) {
    CHECK(guard < 1000);
    advance_all(s, s.next_plan(), token);
    s.check_invariants();
  }
}

}  // namespace

TEST_CASE(chunked_prefill_respects_the_token_budget) {
  SchedulerConfig c = small_config();
  c.max_num_batched_tokens = 5;
  Scheduler s(c);
  s.submit(1, std::vector<int32_t>(12, 3), 4);
  std::vector<int32_t> chunks;
  for (int i = 0; i < 3; ++i) {
    Plan p = s.next_plan();
    CHECK_EQ(p.num_requests(), 1);
    chunks.push_back(p.extend_lens[0]);
    CHECK_EQ(p.sample[0], i == 2 ? 1 : 0);
    advance_all(s, p, 1);
  }
  CHECK(chunks == (std::vector<int32_t>{5, 5, 2}));
  CHECK_EQ(s.request_info(1).state, std::string("Decoding"));
}

TEST_CASE(decodes_come_first_then_prefill_fills_the_budget) {
  SchedulerConfig c = small_config();
  c.max_num_batched_tokens = 6;
  Scheduler s(c);
  s.submit(1, {1, 2}, 10);
  advance_all(s, s.next_plan(), 5);
  s.submit(2, std::vector<int32_t>(20, 7), 10);
  Plan p = s.next_plan();
  CHECK(p.request_ids == (std::vector<int64_t>{1, 2}));
  CHECK(p.extend_lens == (std::vector<int32_t>{1, 5}));
  CHECK(p.prefix_lens == (std::vector<int32_t>{2, 0}));
  CHECK_EQ(p.input_ids[0], 5);
}

TEST_CASE(running_requests_are_capped) {
  SchedulerConfig c = small_config();
  c.max_running_requests = 2;
  Scheduler s(c);
  for (int id = 0; id < 4; ++id) s.submit(id, {1, 2, 3}, 2);
  Plan p = s.next_plan();
  CHECK_EQ(p.num_requests(), 2);
  CHECK_EQ(s.stats().num_waiting, 2);
}

TEST_CASE(pages_running_out_retract_the_newest_request) {
  SchedulerConfig c = small_config();
  c.num_pages = 5;  // 4 usable pages of 4 tokens
  c.enable_prefix_cache = false;
  Scheduler s(c);
  s.submit(1, {1, 2, 3, 4, 5, 6, 7, 8}, 8);  // 2 pages
  s.submit(2, {9, 10, 11, 12, 13, 14, 15, 16}, 8);  // 2 pages
  advance_all(s, s.next_plan(), 0);  // both now need a third page for position 8
  Plan p = s.next_plan();
  CHECK(p.request_ids == (std::vector<int64_t>{1}));
  CHECK_EQ(s.request_info(2).state, std::string("Retracted"));
  CHECK_EQ(s.stats().num_retractions, 1);
  s.check_invariants();
  advance_all(s, p, 0);
  run_until_gone(s, 1, 0);
  run_until_gone(s, 2, 0);
  CHECK_EQ(s.stats().pages_free, 4);
}

TEST_CASE(third_plan_in_flight_is_refused) {
  Scheduler s(small_config());
  s.submit(1, {1, 2}, 5);
  s.next_plan();
  s.next_plan();
  CHECK_THROWS(s.next_plan(), SchedulerError, "call advance() first");
  CHECK_THROWS(s.advance(StepEvents{}), InvalidArgument, "request 1 (state Decoding) reported no tokens in step 1");
}

TEST_CASE(multi_turn_conversation_reuses_prompt_and_generated_tokens) {
  SchedulerConfig c = small_config();
  c.page_size = 1;
  c.num_pages = 256;
  Scheduler s(c);
  std::vector<int32_t> history;
  for (int turn = 0; turn < 10; ++turn) {
    std::vector<int32_t> prompt = history;
    for (int i = 0; i < 3; ++i) prompt.push_back(100 + turn);
    s.submit(turn, prompt, 4);
    Plan first = s.next_plan();
    // Without overlap the last generated token never reached the model: all but it hit.
    CHECK_EQ(first.prefix_lens[0], history.empty() ? 0 : static_cast<int32_t>(history.size()) - 1);
    history = prompt;
    advance_all(s, first, 50 + turn);
    history.push_back(50 + turn);
    while (s.has_request(turn)) {
      advance_all(s, s.next_plan(), 50 + turn);
      history.push_back(50 + turn);
    }
  }
  s.check_invariants();
}

TEST_CASE(random_workloads_keep_every_invariant) {
  std::mt19937 rng(1234);
  int64_t total_finished = 0, total_retracted = 0, total_hits = 0;
  for (int trial = 0; trial < 40; ++trial) {
    SchedulerConfig c;
    c.num_pages = 8 + static_cast<int32_t>(rng() % 40);
    c.page_size = 1 + static_cast<int32_t>(rng() % 4);
    c.max_num_batched_tokens = 2 + static_cast<int32_t>(rng() % 30);
    c.max_running_requests = 1 + static_cast<int32_t>(rng() % 6);
    c.decode_width = 1 + static_cast<int32_t>(rng() % 3);
    c.enable_prefix_cache = rng() % 4 != 0;
    c.max_context_len = 128;
    Scheduler s(c);
    std::vector<int32_t> shared;
    for (int i = 0; i < 40; ++i) shared.push_back(static_cast<int32_t>(rng() % 3));
    std::deque<Plan> inflight;
    int64_t next_id = 0;
    for (int step = 0; step < 400 || !inflight.empty(); ++step) {
      if (step < 400 && next_id < 20 && rng() % 3 == 0) {
        std::vector<int32_t> prompt(shared.begin(), shared.begin() + rng() % 40);
        prompt.push_back(static_cast<int32_t>(rng() % 3));
        try {
          s.submit(next_id, prompt, 1 + static_cast<int32_t>(rng() % 10));
        } catch (const InvalidArgument&) {  // too long for this pool: refused up front
        }
        ++next_id;
      }
      if (step < 400 && inflight.size() < 2 && (inflight.empty() || rng() % 2 == 0)) {
        inflight.push_back(s.next_plan());
      } else {
        // Report every token-producing entry of the oldest plan whose request lives:
        // 1..decode_width tokens for a speculative decode, 1 otherwise.
        const Plan& plan = inflight.front();
        std::vector<int64_t> ids, finished;
        std::vector<int32_t> counts, tokens;
        for (int32_t i = 0, off = 0; i < plan.num_requests(); off += plan.extend_lens[i], ++i) {
          if (!plan.sample[i] || !s.has_request(plan.request_ids[i])) continue;
          const bool drafts = c.decode_width > 1 && plan.extend_lens[i] == c.decode_width &&
                              plan.input_ids[off + 1] == -1;
          const int32_t n = drafts ? 1 + static_cast<int32_t>(rng() % c.decode_width) : 1;
          ids.push_back(plan.request_ids[i]);
          counts.push_back(n);
          for (int32_t k = 0; k < n; ++k) tokens.push_back(static_cast<int32_t>(rng() % 3));
          if (rng() % 12 == 0) finished.push_back(plan.request_ids[i]);
        }
        s.advance(StepEvents{ids, counts, tokens, finished, {}});
        inflight.pop_front();
      }
      if (rng() % 50 == 0 && next_id > 0) s.abort(static_cast<int64_t>(rng() % next_id));
      s.check_invariants();
    }
    for (int64_t id = 0; id < next_id; ++id) s.abort(id);
    s.check_invariants();
    const Stats st = s.stats();
    CHECK_EQ(st.pages_used, 0);
    CHECK_EQ(st.pages_free + st.pages_cached, st.pages_total);
    total_finished += st.num_finished;
    total_retracted += st.num_retractions;
    total_hits += st.prefix_hit_tokens;
  }
  // The runs did exercise what they are meant to.
  CHECK(total_finished > 400);
  CHECK(total_retracted > 10);
  CHECK(total_hits > 100);
}
