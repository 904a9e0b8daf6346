/*
 * forge.reload — what hot reload needs from the OS: an inotify watch over the services
 * directory tree, and a process-wide generation counter.
 *
 * The main thread watches the directory, validates a changed service in a fresh sandbox and,
 * only if it is valid, records the new version in the store and publishes a new generation.
 * Every HTTP worker compares the generation it loaded with reload.generation() before a
 * request (one atomic load) and swaps its registry between requests, so a request always
 * finishes on the version it started with. forge.http reads the same counter (reload.counter)
 * to know when an answer it replays without Lua is out of date.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "forge/forge.h"

#define WATCHER_MT "forge.reload.watcher"
#define COUNTER_MT "forge.reload.counter"  /* known to runtime/http.c */
#define WATCH_MASK (IN_CREATE | IN_DELETE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | \
                    IN_DELETE_SELF | IN_ATTRIB)
#define MAX_DEPTH 8

static atomic_llong generation;

struct watcher {
    int fd;
};

#define towatcher(L) ((struct watcher *)luaL_checkudata(L, 1, WATCHER_MT))

/* Watch `path` and its subdirectories (symlinks not followed), up to MAX_DEPTH levels. */
static int add_tree(int fd, const char *path, int depth)
{
    if (inotify_add_watch(fd, path, WATCH_MASK | IN_DONT_FOLLOW | IN_ONLYDIR) < 0)
        return -errno;
    if (depth >= MAX_DEPTH)
        return 0;
    DIR *d = opendir(path);
    if (!d)
        return 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' && (!e->d_name[1] || (e->d_name[1] == '.' && !e->d_name[2])))
            continue;
        char sub[PATH_MAX];
        if (snprintf(sub, sizeof sub, "%s/%s", path, e->d_name) >= (int)sizeof sub)
            continue;
        struct stat st;
        if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode))
            add_tree(fd, sub, depth + 1);
    }
    closedir(d);
    return 0;
}

/***
 * reload.watch(dir) -> watcher | nil, err. Watches dir and every directory below it.
 */
static int l_reload_watch(lua_State *L)
{
    const char *dir = luaL_checkstring(L, 1);
    struct watcher *w = lua_newuserdatauv(L, sizeof *w, 1);
    w->fd = -1;
    luaL_setmetatable(L, WATCHER_MT);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);                  /* keep the dir for re-adding watches */
    w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (w->fd < 0)
        return forge_pusherror(L, "reload.watch", 0, "inotify: %s", strerror(errno));
    int rc = add_tree(w->fd, dir, 0);
    if (rc < 0)
        return forge_pusherror(L, "reload.watch", 0, "cannot watch %s: %s", dir, strerror(-rc));
    return 1;
}

/*
 * Drain pending events. Returns 1 if any arrived; new directories get watches too, so a
 * service folder created (or installed by rename) is seen as soon as files change in it.
 */
static int drain(struct watcher *w, const char *root)
{
    char buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
    int any = 0;
    for (;;) {
        ssize_t n = read(w->fd, buf, sizeof buf);
        if (n <= 0)
            break;
        any = 1;
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            if ((ev->mask & IN_ISDIR) && (ev->mask & (IN_CREATE | IN_MOVED_TO)))
                add_tree(w->fd, root, 0);          /* cheap: directories are few */
            p += sizeof *ev + ev->len;
        }
    }
    return any;
}

/***
 * watcher:fd() -> the inotify descriptor: readable when watcher:poll would see a change
 * (for http.wait; read it only through poll). Raises on a closed watcher.
 */
static int l_watcher_fd(lua_State *L)
{
    struct watcher *w = towatcher(L);
    if (w->fd < 0)
        return luaL_error(L, "watcher:fd: the watcher is closed");
    lua_pushinteger(L, w->fd);
    return 1;
}

/***
 * watcher:poll([timeout_seconds=0]) -> true if the tree changed since the last poll.
 */
static int l_watcher_poll(lua_State *L)
{
    struct watcher *w = towatcher(L);
    if (w->fd < 0)
        return luaL_error(L, "watcher is closed");
    double timeout = luaL_optnumber(L, 2, 0);
    lua_getiuservalue(L, 1, 1);
    const char *root = lua_tostring(L, -1);
    struct pollfd pfd = {.fd = w->fd, .events = POLLIN};
    int ready = poll(&pfd, 1, (int)(timeout * 1000));
    lua_pushboolean(L, ready > 0 && drain(w, root));
    return 1;
}

static int l_watcher_close(lua_State *L)
{
    struct watcher *w = towatcher(L);
    if (w->fd >= 0)
        close(w->fd);
    w->fd = -1;
    return 0;
}

/***
 * reload.generation() -> the published generation (process-wide).
 */
static int l_reload_generation(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)atomic_load(&generation));
    return 1;
}

/***
 * reload.publish([gen]) -> the new generation: gen if given (must be larger), else +1.
 */
static int l_reload_publish(lua_State *L)
{
    long long next;
    if (lua_isnoneornil(L, 1)) {
        next = atomic_fetch_add(&generation, 1) + 1;
    } else {
        next = (long long)luaL_checkinteger(L, 1);
        long long cur = atomic_load(&generation);
        while (next > cur && !atomic_compare_exchange_weak(&generation, &cur, next))
            ;
        next = atomic_load(&generation);
    }
    lua_pushinteger(L, (lua_Integer)next);
    return 1;
}

/*
 * reload.counter: the generation counter itself, for forge.http (http.serve{generation}), which
 * reads it in C on every request that might be answered without Lua.
 * Stack: [module] -> [module]
 */
static void push_counter(lua_State *L)
{
    const atomic_llong **p = lua_newuserdatauv(L, sizeof *p, 0);
    *p = &generation;
    luaL_newmetatable(L, COUNTER_MT);
    lua_setmetatable(L, -2);
    lua_setfield(L, -2, "counter");
}

int luaopen_forge_reload(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"watch", l_reload_watch},
        {"generation", l_reload_generation},
        {"publish", l_reload_publish},
        {NULL, NULL},
    };
    static const luaL_Reg methods[] = {
        {"poll", l_watcher_poll},
        {"fd", l_watcher_fd},
        {"close", l_watcher_close},
        {NULL, NULL},
    };
    static const luaL_Reg metamethods[] = {
        {"__gc", l_watcher_close},
        {"__close", l_watcher_close},
        {NULL, NULL},
    };
    forge_newclass(L, WATCHER_MT, methods, metamethods);
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.reload");
    push_counter(L);
    return 1;
}
