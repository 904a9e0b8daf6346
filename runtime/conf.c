/*
 * forge.conf — render key-value config files from a table, so that no value can ever
 * reach past its own line.
 *
 *   conf.render("redis", {port = 6379, ["maxmemory-policy"] = "noeviction",
 *                         replicaof = {"127.0.0.1", 30000}})
 *   --> "maxmemory-policy noeviction\nport 6379\nreplicaof 127.0.0.1 30000\n"
 *
 * Service scripts build config files from end-user parameters. A newline in a parameter
 * would start a directive of the user's choosing ("noeviction\nenable-debug-command yes"),
 * so every key and value is checked before it is written: a control character (CR and LF
 * above all) or invalid UTF-8 raises, naming the key. Strings are quoted the way each
 * server's own parser reads them back as exactly one argument: Redis's sdssplitargs
 * ("..." with \" and \\) and PostgreSQL's guc-file.l ('...' with '' and \\). Keys are
 * sorted bytewise, so the same table always gives the same text.
 *
 * No state; all memory is Lua-owned (a userdata for the keys, luaL_Buffers): a raise
 * never leaks.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forge/forge.h"

#define SETTINGS        2               /* stack index of the settings table */
#define KEY_FIRST       "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
#define KEY_CHARS       KEY_FIRST "0123456789.-"
#define KEY_PATTERN     "^[A-Za-z_][A-Za-z0-9_.-]*$"
#define KEY_SHOWN       64              /* bytes of a bad key quoted in an error */

struct format {
    const char *name;
    const char *sep;                    /* between a key and its value */
    const char *yes, *no;               /* booleans */
    int lists;                          /* a list value is several arguments of one directive */
    const char *expected;               /* the value types, for errors */
    void (*push_string)(lua_State *L, const char *s, size_t n);
};


/* ------------------------------------------------------------------------ */
/* checks                                                                   */
/* ------------------------------------------------------------------------ */



/*
 * NULL when s[0..n) is valid UTF-8 without control characters (< 0x20, 0x7f); otherwise
 * what is wrong, e.g. "contains a control character (newline)", written into why.
 */
static const char *text_problem(const char *str, size_t n, char *why, size_t whyn)
{
    static const char *const names[] = {[0] = "NUL", ['\t'] = "tab", ['\n'] = "newline",
                                        ['\r'] = "carriage return"};
    const unsigned char *s = (const unsigned char *)str;
    for (size_t i = 0; i < n;) {
        size_t len = forge_utf8_len(s + i, n - i);
        if (len == 0) {
            snprintf(why, whyn, "is not valid UTF-8 (at offset %zu)", i);
            return why;
        }
        if (s[i] < 0x20 || s[i] == 0x7f) {
            if (s[i] < sizeof names / sizeof *names && names[s[i]])
                snprintf(why, whyn, "contains a control character (%s)", names[s[i]]);
            else
                snprintf(why, whyn, "contains a control character (0x%02x)", s[i]);
            return why;
        }
        i += len;
    }
    return NULL;
}


/* Stack: [] -> [s quoted, escaped and cut]: a key as an error message can show it. */
static void push_printable(lua_State *L, const char *s, size_t n)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addchar(&b, '\'');
    for (size_t i = 0; i < n && i < KEY_SHOWN; i++) {
        static const char from[] = "\n\r\t'\\", to[] = "nrt'\\";
        unsigned char c = (unsigned char)s[i];
        const char *named = c ? strchr(from, c) : NULL;
        if (named) {
            luaL_addchar(&b, '\\');
            luaL_addchar(&b, to[named - from]);
        } else if (c < 0x20 || c >= 0x7f) {
            char hex[5];
            snprintf(hex, sizeof hex, "\\x%02x", c);
            luaL_addstring(&b, hex);
        } else {
            luaL_addchar(&b, (char)c);
        }
    }
    luaL_addstring(&b, n > KEY_SHOWN ? "'..." : "'");
    luaL_pushresult(&b);
}


/* Stack: [... key, value]: raise unless the key is a string of KEY_PATTERN. */
static void check_key(lua_State *L)
{
    if (lua_type(L, -2) != LUA_TSTRING)
        luaL_error(L, "forge.conf.render: keys must be strings, got %s", luaL_typename(L, -2));
    size_t n;
    const char *k = lua_tolstring(L, -2, &n);
    char why[64];
    const char *problem = text_problem(k, n, why, sizeof why);
    if (!problem && !(strspn(k, KEY_FIRST) > 0 && strspn(k, KEY_CHARS) == n))
        problem = "does not match " KEY_PATTERN;
    if (problem) {
        push_printable(L, k, n);
        luaL_error(L, "forge.conf.render: key %s %s", lua_tostring(L, -1), problem);
    }
}


/* Raise "forge.conf.render: value of 'key' [(item i)] <fmt...>" at the caller's file:line. */
static int value_error(lua_State *L, const char *key, lua_Integer item, const char *fmt, ...)
{
    va_list ap;
    luaL_where(L, 1);
    if (item)
        lua_pushfstring(L, "forge.conf.render: value of '%s' (item %I) ", key, (LUAI_UACINT)item);
    else
        lua_pushfstring(L, "forge.conf.render: value of '%s' ", key);
    va_start(ap, fmt);
    lua_pushvfstring(L, fmt, ap);
    va_end(ap);
    lua_concat(L, 3);
    return lua_error(L);
}


/* ------------------------------------------------------------------------ */
/* tokens                                                                   */
/* ------------------------------------------------------------------------ */

/* Stack: [] -> [q s q]: s quoted with q, q written as esc_q and a backslash doubled. */
static void push_quoted(lua_State *L, const char *s, size_t n, char q, const char *esc_q)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addchar(&b, q);
    for (size_t i = 0; i < n; i++) {
        if (s[i] == q)
            luaL_addstring(&b, esc_q);
        else if (s[i] == '\\')
            luaL_addstring(&b, "\\\\");
        else
            luaL_addchar(&b, s[i]);
    }
    luaL_addchar(&b, q);
    luaL_pushresult(&b);
}


/* Stack: [] -> [arg]. sdssplitargs splits on spaces, and a quote anywhere opens a quoted part. */
static void redis_string(lua_State *L, const char *s, size_t n)
{
    if (n > 0 && strcspn(s, " \"'\\") == n)
        lua_pushlstring(L, s, n);
    else
        push_quoted(L, s, n, '"', "\\\"");
}


/* Stack: [] -> [arg]. guc-file.l reads '' and \' as a quote, and processes backslash escapes. */
static void pg_string(lua_State *L, const char *s, size_t n)
{
    push_quoted(L, s, n, '\'', "''");
}


/*
 * Stack: [n] -> [n, text]. A float always has a '.' (postgresql.conf's REAL token needs one:
 * 1e+20 would lex as the integer "1e" and a stray "+20"), so "1.0e+20", "3.0", "0.5".
 */
static void push_number(lua_State *L, const char *key, lua_Integer item)
{
    if (lua_isinteger(L, -1)) {
        lua_pushfstring(L, "%I", (LUAI_UACINT)lua_tointeger(L, -1));
        return;
    }
    double x = (double)lua_tonumber(L, -1);
    if (!isfinite(x))
        value_error(L, key, item, "is not a finite number");
    char buf[64];
    int len = snprintf(buf, sizeof buf - 2, "%.14g", x);       /* Lua's own tostring precision */
    if (!strchr(buf, '.')) {
        char *e = strchr(buf, 'e');
        size_t at = e ? (size_t)(e - buf) : (size_t)len;
        memmove(buf + at + 2, buf + at, (size_t)len - at + 1);
        memcpy(buf + at, ".0", 2);
    }
    lua_pushstring(L, buf);
}


/* Stack: [v] -> [token]: v checked and written as one argument of the format. */
static void push_token(lua_State *L, const struct format *f, const char *key, lua_Integer item)
{
    int t = lua_type(L, -1);
    if (t == LUA_TSTRING) {
        size_t n;
        const char *s = lua_tolstring(L, -1, &n);
        char why[64];
        const char *problem = text_problem(s, n, why, sizeof why);
        if (problem)
            value_error(L, key, item, "%s", problem);
        f->push_string(L, s, n);
    } else if (t == LUA_TNUMBER) {
        push_number(L, key, item);
    } else if (t == LUA_TBOOLEAN && !item) {
        lua_pushstring(L, lua_toboolean(L, -1) ? f->yes : f->no);
    } else {
        value_error(L, key, item, "is a %s (expected %s)", lua_typename(L, t),
                    item ? "a string or number" : f->expected);
    }
    lua_remove(L, -2);
}


/* ------------------------------------------------------------------------ */
/* rendering                                                                */
/* ------------------------------------------------------------------------ */

/* Stack: [v] -> [v]. How many arguments v is: 0 for a single value, n for a list of n. */
static lua_Integer count_args(lua_State *L, const struct format *f, const char *key)
{
    if (!lua_istable(L, -1))
        return 0;
    if (!f->lists)
        value_error(L, key, 0, "is a table (%s takes a string, number or boolean)", f->name);
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1), count = 0;
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        lua_pop(L, 1);
        lua_Integer i = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : 0;
        if (i < 1 || i > n)
            value_error(L, key, 0, "is a table that is not a list");
        count++;
    }
    if (n == 0)
        value_error(L, key, 0, "is an empty list");
    if (count != n)
        value_error(L, key, 0, "is a list with holes");
    return n;
}


/* Stack: [] -> [settings[key]] */
static void push_value(lua_State *L, const char *key)
{
    lua_pushstring(L, key);
    lua_rawget(L, SETTINGS);
}


/* Stack: [... b] -> [... b]: append "key<sep>arg[ arg...]\n". */
static void add_setting(lua_State *L, luaL_Buffer *b, const struct format *f, const char *key)
{
    push_value(L, key);
    lua_Integer n = count_args(L, f, key);
    lua_pop(L, 1);
    luaL_addstring(b, key);
    luaL_addstring(b, f->sep);
    /* i = 0: the value itself; 1..n: list items. The value is fetched anew for each token
     * because nothing may stay pushed above b between buffer operations. */
    for (lua_Integer i = n ? 1 : 0; i <= n; i++) {
        if (i > 1)
            luaL_addchar(b, ' ');
        push_value(L, key);
        if (i) {
            lua_rawgeti(L, -1, i);
            lua_remove(L, -2);
        }
        push_token(L, f, key, i);
        luaL_addvalue(b);
    }
    luaL_addchar(b, '\n');
}


/* Stack: [... b] -> [... b]: each line of s as "# line" (a trailing newline adds none). */
static void add_header(lua_State *L, luaL_Buffer *b, const char *s, size_t n)
{
    const char *end = s + n;
    while (s < end) {
        const char *nl = memchr(s, '\n', (size_t)(end - s));
        size_t len = (size_t)((nl ? nl : end) - s);
        char why[64];
        const char *problem = text_problem(s, len, why, sizeof why);
        if (problem)
            luaL_error(L, "forge.conf.render: header %s", problem);
        luaL_addstring(b, len ? "# " : "#");
        luaL_addlstring(b, s, len);
        luaL_addchar(b, '\n');
        s += len + (nl != NULL);
    }
}


static int compare_keys(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}


/*
 * Stack: [...] -> [... keys]: the settings' keys, checked, copied into a userdata (an array
 * of n pointers, then the NUL-terminated strings they point to) and sorted bytewise.
 */
static const char **sorted_keys(lua_State *L, size_t *n)
{
    size_t bytes = 0;
    *n = 0;
    lua_pushnil(L);
    while (lua_next(L, SETTINGS)) {
        check_key(L);
        bytes += lua_rawlen(L, -2) + 1;
        ++*n;
        lua_pop(L, 1);
    }
    const char **keys = lua_newuserdatauv(L, *n * sizeof *keys + bytes, 0);
    char *p = (char *)(keys + *n);
    size_t i = 0;
    lua_pushnil(L);
    while (lua_next(L, SETTINGS)) {
        size_t len;
        const char *k = lua_tolstring(L, -2, &len);
        keys[i++] = memcpy(p, k, len + 1);
        p += len + 1;
        lua_pop(L, 1);
    }
    qsort(keys, *n, sizeof *keys, compare_keys);
    return keys;
}


/* Stack: [fmt, settings, opts] -> [fmt, settings, opts, header|nil] */
static void push_header_opt(lua_State *L)
{
    static const char *const allowed[] = {"header", NULL};
    if (lua_isnil(L, 3)) {
        lua_pushnil(L);
        return;
    }
    forge_checkkeys(L, 3, "forge.conf.render", allowed);
    int t = lua_getfield(L, 3, "header");
    if (t != LUA_TSTRING && t != LUA_TNIL)
        luaL_error(L, "forge.conf.render: option 'header' must be a string");
}


static const struct format FORMATS[] = {
    {"redis", " ", "yes", "no", 1, "a string, number, boolean or list of strings and numbers", redis_string},
    {"postgresql", " = ", "on", "off", 0, "a string, number or boolean", pg_string},
};


/***
 * Render a config file: one line per setting, keys sorted bytewise.
 * @function render
 * @tparam string format "redis" (`key arg...`) or "postgresql" (`key = value`)
 * @tparam table settings key -> string, number, boolean (yes/no, on/off), or for redis a list
 *   of strings and numbers (several arguments of one directive). Keys match
 *   ^[A-Za-z_][A-Za-z0-9_.-]*$; a control character or invalid UTF-8 anywhere raises.
 * @tparam[opt] table opts header (text written first, each line as a "# " comment)
 * @treturn string
 */
static int l_conf_render(lua_State *L)
{
    static const char *const names[] = {"redis", "postgresql", NULL};
    const struct format *f = &FORMATS[luaL_checkoption(L, 1, NULL, names)];
    luaL_checktype(L, SETTINGS, LUA_TTABLE);
    if (!lua_isnoneornil(L, 3))
        luaL_checktype(L, 3, LUA_TTABLE);
    lua_settop(L, 3);
    push_header_opt(L);                                         /* 4: header or nil */
    size_t n;
    const char **keys = sorted_keys(L, &n);                     /* 5: keys */
    luaL_Buffer b;
    luaL_buffinit(L, &b);                                       /* 6: the text */
    if (lua_isstring(L, 4)) {
        size_t hn;
        const char *h = lua_tolstring(L, 4, &hn);
        add_header(L, &b, h, hn);
    }
    for (size_t i = 0; i < n; i++)
        add_setting(L, &b, f, keys[i]);
    luaL_pushresult(&b);
    return 1;
}


int luaopen_forge_conf(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"render", l_conf_render},
        {NULL, NULL},
    };
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.conf");
    return 1;
}
