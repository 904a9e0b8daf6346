# Service Forge — build, run, test.
#   make deps    install missing Debian packages (apt-get; run as root)
#   make         build build/bin/forge and the Lua modules build/lib/forge/*.so
#   make run     deps + build, then serve on the embedded default (127.0.0.1:5000)
#   make test    deps + build, then every spec; ends with "N passed, N failed"
#   make bench   deps + build, then the benchmarks under bench/
#   make install PREFIX=/usr/local DESTDIR=

PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR   = $(PREFIX)/bin
DATADIR  = $(PREFIX)/share/forge
LIBDIR   = $(PREFIX)/lib/lua/5.4/forge

CC      ?= cc
PKGS     = lua5.4 libmicrohttpd libcurl yaml-0.1 sqlite3
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -Wall -Wextra -Werror -D_GNU_SOURCE -fPIC -Iinclude \
           $(shell pkg-config --cflags $(PKGS) 2>/dev/null) \
           -DFORGE_DATADIR='"$(DATADIR)"'
LDLIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lpthread -lm
# Modules leave the Lua API undefined: the host (lua5.4 or forge) provides it, exactly once.
MOD_LDLIBS = $(shell pkg-config --libs $(filter-out lua5.4,$(PKGS)) 2>/dev/null) -lpthread -lm
LIBFLAG ?= -shared

# One C file per primitive; each is also a loadable Lua module forge.<name>.
MODULES  = $(patsubst runtime/%.c,%,$(filter-out runtime/main.c $(COMMON_SRC),$(wildcard runtime/*.c)))
# Helpers shared by every module (no Lua API of their own).
COMMON_SRC = runtime/lerror.c runtime/laux.c
COMMON_OBJ = $(COMMON_SRC:runtime/%.c=build/obj/%.o)
MOD_OBJ    = $(MODULES:%=build/obj/%.o)
MOD_SO     = $(MODULES:%=build/lib/forge/%.so) build/lib/forge/error.so
HEADERS    = $(wildcard include/forge/*.h runtime/*.h)

DEBIAN_PKGS = build-essential pkg-config lua5.4 liblua5.4-dev libmicrohttpd-dev libcurl4-openssl-dev \
              lua-cjson lua-filesystem libyaml-dev libsqlite3-dev sqlite3 lua-busted lua-check redis-server redis-tools \
              etcd-server etcd-client wrk curl

.PHONY: all deps run test bench install clean lint FORCE
all: build/bin/forge $(MOD_SO)

deps:
	@missing=""; for p in $(DEBIAN_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

build/obj/%.o: runtime/%.c $(HEADERS) | build/obj
	$(CC) $(CFLAGS) -c -o $@ $<

# package.preload table for the binary, one entry per module (so adding runtime/x.c is enough).
# Regenerated on every build, replaced only when the module list changed.
build/obj/preload.c: FORCE | build/obj
	@{ echo '#include "forge/forge.h"'; \
	  for m in error $(MODULES); do echo "int luaopen_forge_$$m(lua_State *L);"; done; \
	  echo 'void forge_preload(lua_State *L) {'; \
	  echo '    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);'; \
	  for m in error $(MODULES); do \
	    echo "    lua_pushcfunction(L, luaopen_forge_$$m); lua_setfield(L, -2, \"forge.$$m\");"; done; \
	  echo '    lua_pop(L, 1);'; echo '}'; } > $@.tmp
	@cmp -s $@.tmp $@ && rm -f $@.tmp || mv $@.tmp $@

build/obj/preload.o: build/obj/preload.c $(HEADERS)
	$(CC) $(CFLAGS) -c -o $@ $<

build/bin/forge: build/obj/main.o build/obj/preload.o $(MOD_OBJ) $(COMMON_OBJ) | build/bin
	$(CC) $(LDFLAGS) -rdynamic -o $@ $^ $(LDLIBS)

build/lib/forge/%.so: build/obj/%.o $(COMMON_OBJ) | build/lib/forge
	$(CC) $(LIBFLAG) $(LDFLAGS) -o $@ $^ $(MOD_LDLIBS)

build/lib/forge/error.so: $(COMMON_OBJ) | build/lib/forge
	$(CC) $(LIBFLAG) $(LDFLAGS) -o $@ $^ $(MOD_LDLIBS)

build/obj build/bin build/lib/forge:
	mkdir -p $@

run: deps all
	FORGE_USER=$${FORGE_USER:-admin} FORGE_PASSWORD=$${FORGE_PASSWORD:-secret} \
	  build/bin/forge serve --config forge.yml

test: deps all
	spec/run

lint:
	luacheck -q scripts services spec bench

bench: deps all
	bench/run

install: all
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DATADIR)
	install -m 755 build/bin/forge $(DESTDIR)$(BINDIR)/forge
	install -m 644 $(MOD_SO) $(DESTDIR)$(LIBDIR)/
	cp -R scripts services $(DESTDIR)$(DATADIR)/
	install -m 644 forge.yml $(DESTDIR)$(DATADIR)/forge.yml.example

clean:
	rm -rf build
