/*
 * The broker's JSON decoding with its limits (forge.util.json_decode: lua-cjson in strict
 * mode, 64 levels, integral numbers as integers, no NaN/Infinity, UTF-8 only), and the
 * encode -> decode round trip the store relies on. Checks in fuzz/json.lua.
 */
#include "fuzz_lua.h"

FUZZ_LUA_SCRIPT_HARNESS("json.lua", 65536)
