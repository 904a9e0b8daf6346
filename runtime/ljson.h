/*
 * JSON pieces shared by the runtime primitives (no Lua API of their own).
 *
 * Reading: every C module that reads JSON decodes it with lua-cjson, through a private
 * instance (cjson.new()) with its own limits, called in protected mode.
 * Writing: the C writers that remain (log.c, the sandbox's capped encoder, the etcd and
 * BOSH request builders) escape strings and format numbers here, so they write the same
 * JSON.
 */
#ifndef FORGE_LJSON_H
#define FORGE_LJSON_H

#include <stddef.h>

#include "forge/forge.h"

/*
 * Keep, in the registry under key, the decode function of a new lua-cjson instance that
 * allows max_depth nested arrays/objects and only RFC 8259 numbers (no hex, NaN,
 * Infinity, leading zeros). Call at luaopen. May raise (lua-cjson missing, memory).
 * Stack: unchanged.
 */
void forge_json_decoder(lua_State *L, const void *key, int max_depth);

/*
 * Decode n bytes of s with the decoder kept under key, in protected mode (a nil
 * is cjson.null). Stack: [...] -> [..., value] and returns 0, or [...] -> [..., message]
 * and returns -1. May raise (memory) only while pushing the text.
 */
int forge_json_decode(lua_State *L, const void *key, const char *s, size_t n);

/*
 * Where a writer sends its output: append n bytes of p. `whole` says that the piece
 * must not be cut (an escape, a UTF-8 character, a quote); a run of plain ASCII may be.
 * Returns 0, or -1 to stop the writer.
 */
typedef int (*forge_json_put)(void *ud, const char *p, size_t n, int whole);

enum {
    FORGE_JSON_UTF8 = 1,        /* invalid UTF-8 is written as \ufffd (else bytes >= 0x80 pass as they are) */
};

/*
 * Write n bytes of s as a JSON string literal, quotes included: ", \ and the control
 * characters (and DEL) escaped, \n \r \t \b \f in their short forms. Returns 0, or -1
 * as soon as put refuses a piece.
 */
int forge_json_string(forge_json_put put, void *ud, const char *s, size_t n, int flags);

#define FORGE_JSON_NUMBER_MAX 32

/*
 * The number at idx as JSON text in out: an integer as is, a float with the fewest
 * digits (15 to 17) that read back as the same double. Returns the length, or 0 for NaN
 * and infinities (JSON has no spelling for them: the caller decides).
 */
size_t forge_json_number(lua_State *L, int idx, char out[FORGE_JSON_NUMBER_MAX]);

#endif
