// A tiny self-contained test harness: TEST_CASE registers a function, CHECK* record
// failures by throwing, main() (in test_main.cpp) runs everything and prints
// "<N> unit tests passed, <M> failed".
#pragma once

#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ts_test {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
  std::ostringstream os;
  os << file << ":" << line << ": " << what;
  throw Failure(os.str());
}

}  // namespace ts_test

#define TS_CAT2(a, b) a##b
#define TS_CAT(a, b) TS_CAT2(a, b)
#define TEST_CASE(name)                                                         \
  static void name();                                                           \
  static const ::ts_test::Registrar TS_CAT(ts_registrar_, name)(#name, &name); \
  static void name()

#define CHECK(cond)                                                  \
  do {                                                               \
    if (!(cond)) ::ts_test::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b)                                                                     \
  do {                                                                                     \
    const auto& ts_a = (a);                                                                \
    const auto& ts_b = (b);                                                                \
    if (!(ts_a == ts_b)) {                                                                 \
      std::ostringstream ts_os;                                                            \
      ts_os << "CHECK_EQ(" #a ", " #b "): " << ts_a << " != " << ts_b;                     \
      ::ts_test::fail(__FILE__, __LINE__, ts_os.str());                                    \
    }                                                                                      \
  } while (0)

// Checks that `expr` throws `Type` whose what() contains `substr`.
#define CHECK_THROWS(expr, Type, substr)                                                        \
  do {                                                                                          \
    bool ts_thrown = false;                                                                     \
    try {                                                                                       \
      (void)(expr);                                                                             \
    } catch (const Type& ts_e) {                                                                \
      ts_thrown = true;                                                                         \
      if (std::string(ts_e.what()).find(substr) == std::string::npos) {                         \
        ::ts_test::fail(__FILE__, __LINE__, std::string("wrong message: ") + ts_e.what());      \
      }                                                                                         \
    }                                                                                           \
    if (!ts_thrown) ::ts_test::fail(__FILE__, __LINE__, "expected " #Type " from " #expr);     \
  } while (0)
