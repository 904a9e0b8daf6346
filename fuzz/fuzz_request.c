/*
 * The broker's request parsing in Lua (scripts/forge/request.lua, util.lua): the request
 * target (path segments, query) and the body (JSON, urlencoded and multipart forms).
 * Input: "<request target>\n<content-type>\n<body>". Checks in fuzz/request.lua; Lua line
 * coverage guides the fuzzer (fuzz_lua.h).
 */
#include "fuzz_lua.h"

FUZZ_LUA_SCRIPT_HARNESS("request.lua", 65536)
