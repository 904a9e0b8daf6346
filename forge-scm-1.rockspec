rockspec_format = "3.0"
package = "forge"
version = "scm-1"
source = { url = "git+file:///work/main" }
description = {
  summary = "Service Forge: an on-demand Open Service Broker, C core with Lua on top",
  license = "MIT",
}
dependencies = { "lua >= 5.4", "lua-cjson", "luafilesystem" }
external_dependencies = {
  MICROHTTPD = { header = "microhttpd.h" },
  CURL = { header = "curl/curl.h" },
  YAML = { header = "yaml.h" },
  SQLITE3 = { header = "sqlite3.h" },
  GNUTLS = { header = "gnutls/gnutls.h" },
}
build = {
  type = "make",
  build_target = "all",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    LUA_INCDIR = "$(LUA_INCDIR)",
  },
  install_target = "install",
  install_variables = {
    PREFIX = "$(PREFIX)",
  },
}
test = { type = "command", command = "make test" }
