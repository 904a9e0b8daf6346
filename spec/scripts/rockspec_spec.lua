-- forge-scm-1.rockspec: `luarocks make` builds this checkout into a tree of its own (with a fresh
-- build dir, so build/ is left alone), and what it installs works from that tree alone: every
-- module loads, forge.yaml (runtime/yaml.c and its parts in runtime/yaml/) merges, and the
-- binary finds its Lua library. Pending where luarocks is missing (Debian `luarocks`, in
-- the Makefile's DEBIAN_PKGS). The Lua libraries come from Debian, hence --deps-mode none.
local Broker = require "spec.support.broker"
local shell = require "spec.support.shell"

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- Names of the *.so files in dir, sorted.
local function modules_in(dir)
  local _, out = shell.run("ls " .. q(dir))
  local names = {}
  for name in out:gmatch("([%w_]+)%.so") do names[#names + 1] = name end
  table.sort(names)
  return names
end

-- Run a Lua chunk in a fresh lua5.4 that looks for C modules in the tree first, then where Debian
-- puts the dependencies (lua-cjson); returns code, output.
local function lua_in_tree(tree, chunk)
  local cpath = tree .. "/lib/lua/5.4/?.so;"
  return shell.run("lua5.4 -e " .. q("package.cpath = " .. ("%q"):format(cpath) .. " .. package.cpath " .. chunk))
end

describe("forge-scm-1.rockspec", function()
  local tmp, tree, code, out

  setup(function()
    if shell.run("command -v luarocks") ~= 0 then return end
    tmp = Broker.tmpdir()
    tree = tmp .. "/tree"
    code, out = shell.run(("B=%s luarocks --lua-version 5.4 make --tree %s --deps-mode none forge-scm-1.rockspec")
      :format(q(tmp .. "/build"), q(tree)))
  end)

  teardown(function()
    if tmp then os.execute("rm -rf " .. q(tmp)) end
  end)

  it("builds and installs every module with luarocks make", function()
    if not tmp then return pending("luarocks is not installed") end
    assert.equal(0, code, out)
    local built = modules_in(tmp .. "/build/lib/forge")
    assert.truthy(#built > 1, out)
    assert.same(built, modules_in(tree .. "/lib/lua/5.4/forge"))
    for _, name in ipairs(built) do
      local rc, msg = lua_in_tree(tree, ("local m = require 'forge.%s' assert(type(m) == 'table')"
        .. " io.write(package.searchpath('forge.%s', package.cpath))"):format(name, name))
      assert.equal(0, rc, msg)
      assert.equal(("%s/lib/lua/5.4/forge/%s.so"):format(tree, name), msg)
    end
  end)

  it("installs a forge.yaml made of all its parts", function()
    if not tmp then return pending("luarocks is not installed") end
    assert.equal(0, code, out)
    -- decode and encode (io.c), a merge with operators and an array operator (merge.c, eval.c)
    local rc, text = lua_in_tree(tree, [[
      local yaml = require "forge.yaml"
      local doc = assert(yaml.merge({ "a: 1\nl: [x]\n", "b: (( grab a ))\nc: (( concat \"n\" a ))\nl: [(( append )), z]\n" }))
      io.write(assert(yaml.encode(yaml.decode(assert(yaml.encode(doc))))))]])
    assert.equal(0, rc, text)
    assert.equal("a: 1\nl:\n- x\n- z\nb: 1\nc: n1\n", text)
  end)

  it("installs a forge binary that finds its Lua library in the rock", function()
    if not tmp then return pending("luarocks is not installed") end
    assert.equal(0, code, out)
    local rc, help = shell.run("env -u FORGE_SCRIPTS " .. q(tree .. "/bin/forge") .. " help")
    assert.equal(0, rc, help)
    assert.matches("usage: forge <command>", help, 1, true)
  end)
end)
