rockspec_format = "3.0"
package = "forge"
version = "scm-1"
-- A placeholder: put the project's public repository here before publishing the rock.
-- `luarocks make` in a checkout builds that checkout and never reads it.
source = { url = "git+https://git.example.org/service-forge/forge.git" }
description = {
  summary = "Service Forge: an on-demand Open Service Broker, C core with Lua on top",
  license = "MIT",
}
dependencies = { "lua >= 5.4", "lua-cjson", "luafilesystem" }
-- Found where Debian puts them; the Makefile takes the exact flags from pkg-config.
external_dependencies = {
  MICROHTTPD = { header = "microhttpd.h" },
  CURL = { library = "curl" },
  YAML = { header = "yaml.h" },
  SQLITE3 = { header = "sqlite3.h" },
  OPENSSL = { header = "openssl/evp.h" },
  PQ = { library = "pq" },
  GNUTLS = { header = "gnutls/gnutls.h" },
}
-- The Makefile builds bin/forge and lib/forge/*.so, every module with the C files it is
-- made of (forge.yaml: runtime/yaml.c and runtime/yaml/*.c). PREFIX at build time is where
-- the binary looks for its Lua library (PREFIX/share/forge, which stays in the rock's dir).
build = {
  type = "make",
  build_target = "all",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    PREFIX = "$(PREFIX)",
  },
  install_target = "install",
  install_variables = {
    PREFIX = "$(PREFIX)",
    BINDIR = "$(BINDIR)",
    LIBDIR = "$(LIBDIR)/forge",
  },
}
test = { type = "command", command = "make test" }
