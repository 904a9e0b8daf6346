# Service Forge — build, run, test.
#   make deps    install missing Debian packages (apt-get; run as root)
#   make         build $(B)/bin/forge and the Lua modules $(B)/lib/forge/*.so
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
B       ?= build
# `make asan` builds $(B)=build/asan with SANFLAGS (the fuzz spec runs that binary)
SANFLAGS ?=
PKGS     = lua5.4 libmicrohttpd libcurl yaml-0.1 sqlite3 libcrypto libpq
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -Wall -Wextra -Werror -D_GNU_SOURCE -fPIC -Iinclude \
           $(shell pkg-config --cflags $(PKGS) 2>/dev/null) \
           -DFORGE_DATADIR='"$(DATADIR)"' $(SANFLAGS)
LDFLAGS += $(SANFLAGS)
LDLIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lpthread -lm
# Modules leave the Lua API undefined: the host (lua5.4 or forge) provides it, exactly once.
MOD_LDLIBS = $(shell pkg-config --libs $(filter-out lua5.4,$(PKGS)) 2>/dev/null) -lpthread -lm
LIBFLAG ?= -shared

# One C file per primitive; each is also a loadable Lua module forge.<name>.
MODULES  = $(patsubst runtime/%.c,%,$(filter-out runtime/main.c $(COMMON_SRC),$(wildcard runtime/*.c)))
# Helpers shared by every module (no Lua API of their own).
COMMON_SRC = runtime/lerror.c runtime/laux.c runtime/ltxn.c runtime/lnet.c
COMMON_OBJ = $(COMMON_SRC:runtime/%.c=$(B)/obj/%.o)
MOD_OBJ    = $(MODULES:%=$(B)/obj/%.o)
MOD_SO     = $(MODULES:%=$(B)/lib/forge/%.so) $(B)/lib/forge/error.so
HEADERS    = $(wildcard include/forge/*.h runtime/*.h)

DEBIAN_PKGS = build-essential pkg-config lua5.4 liblua5.4-dev libmicrohttpd-dev libcurl4-openssl-dev \
              lua-cjson lua-filesystem libyaml-dev libsqlite3-dev libssl-dev sqlite3 lua-busted lua-check redis-server redis-tools \
              etcd-server etcd-client wrk curl openssl python3-minimal tar libpq-dev postgresql postgresql-client

.PHONY: all deps run test bench install clean lint asan FORCE
all: $(B)/bin/forge $(MOD_SO)

asan:
	$(MAKE) B=build/asan SANFLAGS="-O1 -fsanitize=address,undefined -fno-omit-frame-pointer" build/asan/bin/forge

deps:
	@missing=""; for p in $(DEBIAN_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

$(B)/obj/%.o: runtime/%.c $(HEADERS) | $(B)/obj
	$(CC) $(CFLAGS) -c -o $@ $<

# package.preload table for the binary, one entry per module (so adding runtime/x.c is enough).
# Regenerated on every build, replaced only when the module list changed.
$(B)/obj/preload.c: FORCE | $(B)/obj
	@{ echo '#include "forge/forge.h"'; \
	  for m in error $(MODULES); do echo "int luaopen_forge_$$m(lua_State *L);"; done; \
	  echo 'void forge_preload(lua_State *L) {'; \
	  echo '    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);'; \
	  for m in error $(MODULES); do \
	    echo "    lua_pushcfunction(L, luaopen_forge_$$m); lua_setfield(L, -2, \"forge.$$m\");"; done; \
	  echo '    lua_pop(L, 1);'; echo '}'; } > $@.tmp
	@cmp -s $@.tmp $@ && rm -f $@.tmp || mv $@.tmp $@

$(B)/obj/preload.o: $(B)/obj/preload.c $(HEADERS)
	$(CC) $(CFLAGS) -c -o $@ $<

$(B)/bin/forge: $(B)/obj/main.o $(B)/obj/preload.o $(MOD_OBJ) $(COMMON_OBJ) | $(B)/bin
	$(CC) $(LDFLAGS) -rdynamic -o $@ $^ $(LDLIBS)

$(B)/lib/forge/%.so: $(B)/obj/%.o $(COMMON_OBJ) | $(B)/lib/forge
	$(CC) $(LIBFLAG) $(LDFLAGS) -o $@ $^ $(MOD_LDLIBS)

$(B)/lib/forge/error.so: $(COMMON_OBJ) | $(B)/lib/forge
	$(CC) $(LIBFLAG) $(LDFLAGS) -o $@ $^ $(MOD_LDLIBS)

$(B)/obj $(B)/bin $(B)/lib/forge:
	mkdir -p $@

run: deps all
	FORGE_USER=$${FORGE_USER:-admin} FORGE_PASSWORD=$${FORGE_PASSWORD:-secret} \
	  FORGE_ADMIN_USER=$${FORGE_ADMIN_USER:-ops} FORGE_ADMIN_PASSWORD=$${FORGE_ADMIN_PASSWORD:-ops-secret} \
	  $(B)/bin/forge serve --config forge.yml

test: deps all asan
	spec/run

lint:
	luacheck -q scripts services spec bench

bench: deps all
	bench/run

install: all
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DATADIR)
	install -m 755 $(B)/bin/forge $(DESTDIR)$(BINDIR)/forge
	install -m 644 $(MOD_SO) $(DESTDIR)$(LIBDIR)/
	cp -R scripts services $(DESTDIR)$(DATADIR)/
	install -m 644 forge.yml $(DESTDIR)$(DATADIR)/forge.yml.example

clean:
	rm -rf build
