// Op registration shared by the kernels of the decodekit_cpu extension (each .cpp adds a fragment).
// torch rebuilds the extension when a .cpp changes, not this header: touch a .cpp after editing it.
#pragma once

#include <torch/library.h>

// The op namespace; overridable so that benchmark variants can be loaded side by side in one process.
#ifndef SG_LIBNAME
#define SG_LIBNAME decodekit_cpu
#endif
// One level of indirection so that SG_LIBNAME is expanded before TORCH_LIBRARY_FRAGMENT pastes it.
#define SG_TORCH_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define SG_TORCH_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)
