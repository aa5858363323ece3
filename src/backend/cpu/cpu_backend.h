// The CPU implementation of the op table (backend/backend.h): the numeric oracle. Every output element is
// produced by one thread with a fixed summation order (quant::vec_dot per (token, row)), work is split with
// ThreadPool's static partition, and no op keeps state, so results do not depend on batch size, chunking or
// thread count.
#pragma once

#include <memory>

#include "backend/backend.h"

namespace dsv4 {

class ThreadPool;

// pool: the engine's thread pool (must outlive the backend); nullptr = default_thread_pool().
std::unique_ptr<Backend> make_cpu_backend(ThreadPool* pool = nullptr);

// A process-wide CPU backend on default_thread_pool(): the default owner of session state memory when no
// backend is named (tests, tools). Its memory ops are thread-safe; its matmul scratch is not, so concurrent
// forwards must use their own backend.
Backend& host_backend();

}  // namespace dsv4
