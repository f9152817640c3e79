// Configuration of the scheduler: pool geometry and the planner's budgets.
#pragma once

#include <cstdint>
#include <string>

#include "errors.h"

namespace tokenspeed::sched {

struct SchedulerConfig {
  // Pages in the KV pool, page 0 included. Page 0 is the null page: never handed out,
  // it pads block-table rows. So num_pages - 1 pages are usable.
  int32_t num_pages = 1024;
  // Tokens per KV page; also the granularity of the prefix cache.
  int32_t page_size = 16;
  // Token budget of one step: decode tokens (decode_width per decode) + prefill chunk tokens.
  int32_t max_num_batched_tokens = 8192;
  // Requests that hold a slot (a block-table row) and pages at once.
  int32_t max_running_requests = 256;
  // Token slots reserved per decode step: 1 + number of speculative (draft) tokens.
  int32_t decode_width = 1;
  // Reuse KV pages of finished requests whose tokens are a prefix of a new request.
  bool enable_prefix_cache = true;
  // Longest KV extent of one request (prompt + generated + draft slack); fixes the
  // width of the block table, max_pages_per_req() columns.
  int32_t max_context_len = 65536;

  int32_t max_pages_per_req() const { return (max_context_len + page_size - 1) / page_size; }

  void validate() const {
    auto need = [](bool ok, const char* what) {
      if (!ok) throw InvalidArgument(std::string("SchedulerConfig: ") + what);
    };
    need(page_size >= 1, "page_size must be >= 1");
    need(num_pages >= 2, "num_pages must be >= 2 (page 0 is the reserved null page)");
    need(max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1");
    need(max_running_requests >= 1, "max_running_requests must be >= 1");
    need(decode_width >= 1, "decode_width must be >= 1 (1 + speculative tokens)");
    need(max_context_len >= 1, "max_context_len must be >= 1");
  }
};

}  // namespace tokenspeed::sched
