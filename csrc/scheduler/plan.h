// Plain data crossing the scheduler's API: the plan of one step, the executor's report of
// a step, statistics, and a debugging view of one request.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace tokenspeed::sched {

// One step's batch as flat arrays. Entry i (i < num_requests()) is request_ids[i]; its
// extend_lens[i] input tokens and positions are the next extend_lens[i] elements of
// input_ids / positions (entries are concatenated in order). Decodes come first, then
// prefill chunks.
struct Plan {
  uint64_t step = 0;                 // 1, 2, ...: advance() reports steps in this order
  std::vector<int64_t> request_ids;
  std::vector<int32_t> slots;        // row of the block table holding the request's pages
  std::vector<int32_t> prefix_lens;  // tokens already in KV (cache hits, earlier chunks/steps)
  std::vector<int32_t> extend_lens;  // tokens written this step (chunk length or decode_width)
  std::vector<uint8_t> sample;       // 1: the step produces tokens for this request
  std::vector<int32_t> input_ids;    // -1: not known yet (previous step's output, or a draft slot)
  std::vector<int32_t> positions;

  int32_t num_requests() const { return static_cast<int32_t>(request_ids.size()); }
  int32_t num_tokens() const { return static_cast<int32_t>(input_ids.size()); }
};

// What the executor reports for the oldest plan in flight. num_tokens[i] tokens of
// `tokens` (concatenated) belong to request_ids[i]. finished: requests that stopped
// (EOS / stop string) with this step's tokens. aborted: requests to drop (any state).
struct StepEvents {
  std::span<const int64_t> request_ids;
  std::span<const int32_t> num_tokens;
  std::span<const int32_t> tokens;
  std::span<const int64_t> finished;
  std::span<const int64_t> aborted;
};

struct FinishedRequest {
  int64_t request_id;
  std::string reason;  // "stop", "length" or "abort"
};

struct Stats {
  int32_t pages_total = 0;   // usable pages: num_pages - 1
  int32_t pages_free = 0;
  int32_t pages_used = 0;    // held by at least one request
  int32_t pages_cached = 0;  // in the prefix cache and held by nobody (evictable)
  int32_t num_waiting = 0;   // Waiting + Retracted
  int32_t num_running = 0;   // Prefilling + Decoding
  int32_t num_inflight_plans = 0;
  int64_t prefix_hit_tokens = 0;       // sum over admissions of tokens served from the cache
  int64_t prefix_lookup_tokens = 0;    // sum over admissions of the request's known tokens
  int64_t num_retractions = 0;
  int64_t num_finished = 0;            // including aborted
  int64_t num_steps = 0;
};

struct RequestInfo {
  int64_t request_id = 0;
  std::string state;
  std::vector<int32_t> tokens;
  int32_t prompt_len = 0;
  int32_t max_new_tokens = 0;
  int32_t pending_steps = 0;  // issued plans that will still report tokens for it
  int32_t slot = -1;          // -1 unless Prefilling/Decoding
  int32_t sched = 0;          // KV tokens written or scheduled (0 unless resident)
  int32_t cached_pages = 0;
  std::vector<int32_t> pages;
};

}  // namespace tokenspeed::sched
