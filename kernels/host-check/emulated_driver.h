// emulated_driver.h: what the emulated cuBLAS (emulated_cublas.cpp) takes from the emulated
// driver (emulated_driver.cpp): issuing work on a stream (run now, or recorded while the stream is
// captured) and checking that a range lies inside one live device allocation.
#pragma once
#include <cstddef>
#include <functional>

__attribute__((visibility("default"))) void phi3_emulated_issue(void* stream, const char* what,
                                                                 std::function<void()> run);
__attribute__((visibility("default"))) void phi3_emulated_check(const void* p, size_t bytes,
                                                                const char* what);
