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
PKGS     = lua5.4 libmicrohttpd libcurl yaml-0.1 sqlite3 libcrypto libpq gnutls
CFLAGS  ?= -O2 -g
# override: `make CFLAGS=...` (as luarocks runs it) replaces only the optimisation flags
override CFLAGS += -std=c11 -Wall -Wextra -Werror -D_GNU_SOURCE -fPIC -Iinclude \
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
COMMON_SRC = runtime/lerror.c runtime/laux.c runtime/ltxn.c runtime/lnet.c runtime/lmetrics.c runtime/ltls.c \
             runtime/ljson.c
COMMON_OBJ = $(COMMON_SRC:runtime/%.c=$(B)/obj/%.o)
MOD_OBJ    = $(MODULES:%=$(B)/obj/%.o)
MOD_SO     = $(MODULES:%=$(B)/lib/forge/%.so) $(B)/lib/forge/error.so
# forge.yaml's parts (runtime/yaml/*.c), linked into its module and the binary.
YAML_PARTS = $(patsubst runtime/%.c,%,$(wildcard runtime/yaml/*.c))
YAML_OBJ   = $(YAML_PARTS:%=$(B)/obj/%.o)
HEADERS    = $(wildcard include/forge/*.h runtime/*.h runtime/yaml/*.h)

DEBIAN_PKGS = build-essential pkg-config lua5.4 liblua5.4-dev libmicrohttpd-dev libcurl4-openssl-dev \
              lua-cjson lua-filesystem libyaml-dev libsqlite3-dev libssl-dev sqlite3 lua-busted lua-check redis-server redis-tools \
              etcd-server etcd-client wrk curl openssl python3-minimal tar libpq-dev postgresql postgresql-client clang libclang-rt-14-dev \
              chromium python3-prometheus-client bubblewrap libgnutls28-dev libhiredis-dev luarocks

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

$(B)/bin/forge: $(B)/obj/main.o $(B)/obj/preload.o $(MOD_OBJ) $(YAML_OBJ) $(COMMON_OBJ) | $(B)/bin
	$(CC) $(LDFLAGS) -rdynamic -o $@ $^ $(LDLIBS)

$(B)/lib/forge/%.so: $(B)/obj/%.o $(COMMON_OBJ) | $(B)/lib/forge
	$(CC) $(LIBFLAG) $(LDFLAGS) -o $@ $^ $(MOD_LDLIBS)

$(B)/lib/forge/yaml.so: $(YAML_OBJ)

$(B)/lib/forge/error.so: $(COMMON_OBJ) | $(B)/lib/forge
	$(CC) $(LIBFLAG) $(LDFLAGS) -o $@ $^ $(MOD_LDLIBS)

$(YAML_OBJ): | $(B)/obj/yaml

$(B)/obj $(B)/obj/yaml $(B)/bin $(B)/lib/forge:
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

# ---- coverage-guided fuzzing (libFuzzer; fuzz/README.md, docs/fuzzing.md) ----------------
#   make fuzz         every harness for FUZZ_SECONDS (default 60) each; new inputs kept in
#                     $(FUZZ_B)/corpus/<harness>, crashes in $(FUZZ_B)/artifacts/<harness>/
#   make fuzz-smoke   every seed and regression input once, then FUZZ_SMOKE_SECONDS (4) of
#                     fuzzing per harness; fails on any crash (spec/run runs it)
#   make fuzz FUZZ_TARGETS=yaml FUZZ_SECONDS=600 FUZZ_FLAGS=-max_len=8192   one harness, longer
FUZZ_CC            ?= clang
FUZZ_B             ?= build/fuzz
FUZZ_SECONDS       ?= 60
FUZZ_SMOKE_SECONDS ?= 4
FUZZ_TIMEOUT       ?= 10
FUZZ_FLAGS         ?=
FUZZ_TARGETS       ?= yaml request json etcd bosh resp sandbox sandbox_json
FUZZ_PKGS           = lua5.4 libcurl yaml-0.1 libcrypto
FUZZ_CFLAGS         = -O1 -g -fno-omit-frame-pointer -std=c11 -D_GNU_SOURCE -fPIC -Iinclude -Iruntime \
                      $(shell pkg-config --cflags $(FUZZ_PKGS) 2>/dev/null) -DCURL_DISABLE_TYPECHECK \
                      -DFORGE_DATADIR='"$(DATADIR)"' -DFUZZ_ROOT='"$(CURDIR)"' \
                      -fsanitize=address,undefined
FUZZ_LDLIBS         = $(shell pkg-config --libs $(FUZZ_PKGS) 2>/dev/null) -lpthread -lm -ldl
FUZZ_COMMON         = lerror laux ltxn lnet lmetrics ljson
# runtime modules linked into each harness; FUZZ_SRC_x: the runtime file harness x #includes
FUZZ_MODS_yaml          = yaml $(YAML_PARTS)
FUZZ_MODS_sandbox       = crypto log $(FUZZ_MODS_yaml) pattern conf
FUZZ_MODS_sandbox_json  = $(FUZZ_MODS_sandbox)
FUZZ_SRC_sandbox        = runtime/sandbox.c
FUZZ_SRC_sandbox_json   = runtime/sandbox.c
FUZZ_SRC_etcd           = runtime/etcd.c
FUZZ_SRC_bosh           = runtime/bosh.c
FUZZ_SRC_resp           = runtime/resp.c
FUZZ_BINS           = $(FUZZ_TARGETS:%=$(FUZZ_B)/bin/fuzz_%)
FUZZ_RUN            = -timeout=$(FUZZ_TIMEOUT) -print_final_stats=1

.PHONY: fuzz fuzz-smoke fuzz-build
fuzz-build: $(FUZZ_BINS)

$(FUZZ_B)/obj/%.o: runtime/%.c $(HEADERS) | $(FUZZ_B)/obj
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c -o $@ $<

define FUZZ_HARNESS
$(FUZZ_B)/bin/fuzz_$(1): fuzz/fuzz_$(1).c $(wildcard fuzz/*.h) $(FUZZ_SRC_$(1)) $(HEADERS) \
    $(addprefix $(FUZZ_B)/obj/,$(addsuffix .o,$(FUZZ_MODS_$(1)) $(FUZZ_COMMON))) | $(FUZZ_B)/bin
	$$(FUZZ_CC) $$(FUZZ_CFLAGS) -fsanitize=fuzzer -rdynamic -o $$@ fuzz/fuzz_$(1).c $$(filter %.o,$$^) $$(FUZZ_LDLIBS)
endef
$(foreach h,$(FUZZ_TARGETS),$(eval $(call FUZZ_HARNESS,$(h))))

$(YAML_PARTS:%=$(FUZZ_B)/obj/%.o): | $(FUZZ_B)/obj/yaml

$(FUZZ_B)/obj $(FUZZ_B)/obj/yaml $(FUZZ_B)/bin:
	mkdir -p $@

fuzz: $(FUZZ_BINS)
	@failed=""; for h in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_B)/corpus/$$h $(FUZZ_B)/artifacts/$$h; \
	  dict=; [ -f fuzz/dict/$$h.dict ] && dict=-dict=fuzz/dict/$$h.dict; \
	  echo "== fuzz_$$h: $(FUZZ_SECONDS) s"; \
	  $(FUZZ_B)/bin/fuzz_$$h $(FUZZ_RUN) -max_total_time=$(FUZZ_SECONDS) $$dict \
	    -artifact_prefix=$(FUZZ_B)/artifacts/$$h/ $(FUZZ_FLAGS) \
	    $(FUZZ_B)/corpus/$$h fuzz/corpus/$$h 2>&1 | grep -E '^#[0-9]+.*(INITED|DONE)|^stat::|ERROR|==fuzz==|SUMMARY|artifact' ; \
	  [ "$${PIPESTATUS[0]}" -eq 0 ] || failed="$$failed $$h"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in:$$failed (inputs under $(FUZZ_B)/artifacts/)"; exit 1; fi

fuzz-smoke: SHELL = /bin/bash
fuzz: SHELL = /bin/bash
fuzz-smoke: $(FUZZ_BINS)
	@failed=""; for h in $(FUZZ_TARGETS); do \
	  bin=$(FUZZ_B)/bin/fuzz_$$h; log=$(FUZZ_B)/smoke/$$h.log; \
	  rm -rf $(FUZZ_B)/smoke/$$h; mkdir -p $(FUZZ_B)/smoke/$$h; \
	  inputs=$$(find fuzz/regressions/$$h fuzz/corpus/$$h -type f -not -path '*/open/*' 2>/dev/null | sort); \
	  open=$$(find fuzz/regressions/$$h/open -type f 2>/dev/null | wc -l); \
	  if [ -n "$$inputs" ] && ! $$bin $(FUZZ_RUN) $$inputs > $$log 2>&1; then \
	    tail -n 40 $$log; echo "fuzz_$$h: a seed or regression input fails"; failed="$$failed $$h"; continue; fi; \
	  dict=; [ -f fuzz/dict/$$h.dict ] && dict=-dict=fuzz/dict/$$h.dict; \
	  if $$bin $(FUZZ_RUN) -max_total_time=$(FUZZ_SMOKE_SECONDS) $$dict -artifact_prefix=$(FUZZ_B)/smoke/$$h- \
	       $(FUZZ_B)/smoke/$$h fuzz/corpus/$$h >> $$log 2>&1; then \
	    echo "fuzz_$$h: ok ($$(echo $$inputs | wc -w) inputs; $$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' $$log | grep -Eo '[0-9]+$$' | tail -n 1) runs in $(FUZZ_SMOKE_SECONDS) s$$( [ $$open -eq 0 ] || echo "; $$open open bug(s) in fuzz/regressions/$$h/open not run"))"; \
	  else tail -n 40 $$log; echo "fuzz_$$h: crash (input in $(FUZZ_B)/smoke/)"; failed="$$failed $$h"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz-smoke failed:$$failed"; exit 1; fi
