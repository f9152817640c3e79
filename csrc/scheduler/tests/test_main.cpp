#include <cstdio>
#include <exception>

#include "harness.h"

int main() {
  int passed = 0, failed = 0;
  for (const auto& c : ts_test::registry()) {
    try {
      c.fn();
      ++passed;
      std::printf("  ok    %s\n", c.name);
    } catch (const std::exception& e) {
      ++failed;
      std::printf("  FAIL  %s: %s\n", c.name, e.what());
    }
  }
  std::printf("%d unit tests passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
