// Exceptions of the scheduler. The pybind11 binding maps them onto Python:
// InvalidArgument -> ValueError (the caller passed something wrong),
// SchedulerError -> RuntimeError (a call came in the wrong order),
// IllegalTransition -> IllegalTransitionError(RuntimeError) (an FSM event that the
// request's state does not accept; inside the scheduler this means a bug).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace tokenspeed::sched {

struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct SchedulerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct IllegalTransition : SchedulerError {
  IllegalTransition(int64_t request_id, std::string_view state, std::string_view event)
      : SchedulerError("request " + std::to_string(request_id) + ": event '" +
                       std::string(event) + "' is illegal in state '" + std::string(state) +
                       "'") {}
};

}  // namespace tokenspeed::sched
