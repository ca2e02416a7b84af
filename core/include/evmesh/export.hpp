// EVMESH_API marks the library's interface. evmesh_core and evmesh_channels are compiled with
// hidden visibility, so a shared build (BUILD_SHARED_LIBS=ON) exports these symbols only: the
// internals (node_impl, the codec's reader, the repair state machine, ...) are not part of the
// ABI and cannot clash with a user's symbols.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define EVMESH_API __attribute__((visibility("default")))
#else
#define EVMESH_API
#endif
