/*
 * forge.sandbox — one service script in its own capped lua_State.
 *
 * The Lua API (require "forge.sandbox") is the supported interface; see docs/sandbox.md.
 * This header gives the limits and defaults to C code that configures sandboxes
 * (runtime/reload.c, runtime/main.c) so they agree with the module.
 */
#ifndef FORGE_SANDBOX_H
#define FORGE_SANDBOX_H

#include <stddef.h>

#include "forge/forge.h"

#define FORGE_SANDBOX_MT            "forge.sandbox"

#define FORGE_SANDBOX_MEMORY        (64 * 1024 * 1024)  /* bytes, whole state */
#define FORGE_SANDBOX_MEMORY_MIN    (1024 * 1024)
#define FORGE_SANDBOX_CPU           2.0                 /* seconds of thread CPU per call */
#define FORGE_SANDBOX_WALL          10.0                /* seconds of wall time per call */
#define FORGE_SANDBOX_MAX_DEPTH     64                  /* nesting of copied values */
#define FORGE_SANDBOX_MAX_COPY      (16 * 1024 * 1024)  /* bytes of one copied value (estimate) */
#define FORGE_SANDBOX_REP_MAX       (1024 * 1024)       /* string.rep result */
#define FORGE_SANDBOX_HOOK_COUNT    10000               /* instructions between clock checks */

/* Limits of one sandbox (the fields of sandbox.new{} in C form). */
struct forge_limits {
    size_t memory;      /* bytes */
    double cpu;         /* seconds per call */
    double wall;        /* seconds per call */
};

int luaopen_forge_sandbox(lua_State *L);

#endif
