-- forge.metrics: the process-wide Prometheus registry. Every render is read back by a real
-- parser (prometheus_client, Debian's python3-prometheus-client) plus a line grammar check; the
-- concurrent spec updates the registry from forge.http worker states in this process.
local metrics = require "forge.metrics"
local proc = require "forge.proc"
local cjson = require "cjson"
local lfs = require "lfs"
local files = require "spec.support.files"

-- The registry lives as long as the process (other spec files share it): every test names its own families.
local serial = 0
local function fresh(base)
  serial = serial + 1
  return string.format("spec_metrics_%d_%s", serial, base)
end

-- Checks the 0.0.4 line grammar and the family structure, then prints the parsed families as JSON.
local PARSER = [=[
import json, re, sys
from prometheus_client.parser import text_string_to_metric_families
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\[\\\"n])*\""
SAMPLE = re.compile(r"(" + NAME + r")(?:\{" + LABEL + r"(?:," + LABEL + r")*\})? (\S+)")
HELP = re.compile(r"# HELP (" + NAME + r") .*")
TYPE = re.compile(r"# TYPE (" + NAME + r") (counter|gauge|histogram)")
SUFFIXES = {"counter": [""], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
text = sys.stdin.read()
if not text.endswith("\n"):
    sys.exit("text does not end with a newline")
seen, family, kind = set(), None, None
for n, line in enumerate(text.split("\n")[:-1], 1):
    m = HELP.fullmatch(line) or TYPE.fullmatch(line)
    if m and line.startswith("# HELP"):
        if m.group(1) in seen:
            sys.exit("line %d: family %s twice" % (n, m.group(1)))
        seen.add(m.group(1))
        family, kind = m.group(1), None
    elif m:
        if m.group(1) != family or kind is not None:
            sys.exit("line %d: TYPE without its HELP" % n)
        kind = m.group(2)
    else:
        m = SAMPLE.fullmatch(line)
        if not m or kind is None or m.group(1) not in [family + s for s in SUFFIXES[kind]]:
            sys.exit("line %d: not a sample of %s: %s" % (n, family, line))
        float(m.group(2))
out = []
for f in text_string_to_metric_families(text):
    if f.type == "untyped":
        sys.exit("untyped family " + f.name)
    out.append({"name": f.name, "type": f.type, "help": f.documentation,
                "samples": [{"name": s.name, "labels": s.labels, "value": repr(s.value)} for s in f.samples]})
print(json.dumps(out))
]=]

-- render() parsed: {families = {[name] = {type=, help=, samples = {...}}}, text = text}. Fails the test
-- when the parser or the grammar check refuses the text.
local function parse()
  local text = metrics.render()
  local path = files.temp(text)
  local p = assert(io.popen("/usr/bin/python3 -c '" .. PARSER .. "' < " .. path .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  os.remove(path)
  assert(ok, "render() does not parse: " .. out)
  local families = {}
  for _, f in ipairs(cjson.decode(out)) do families[f.name] = f end
  return { families = families, text = text }
end

local function same_labels(a, b)
  for k, v in pairs(a) do if b[k] ~= v then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

-- The value of sample `name` with exactly `labels` in the parsed family, or nil.
local function sample(parsed, family, name, labels)
  local f = parsed.families[family]
  for _, s in ipairs(f and f.samples or {}) do
    if s.name == name and same_labels(s.labels, labels or {}) then
      return s.value == "inf" and math.huge or tonumber(s.value)
    end
  end
end

-- How many samples family has.
local function nsamples(parsed, family)
  return #((parsed.families[family] or {}).samples or {})
end

local function close_to(expected, got, slack)
  assert.is_number(got)
  assert.is_true(math.abs(got - expected) <= slack, string.format("expected %s +- %s, got %s", expected, slack, got))
end

describe("forge.metrics", function()
  it("counts with inc, by 1 or n, per label set", function()
    local c = fresh("requests_total")
    metrics.describe(c, "counter", "Requests served.")
    metrics.inc(c)
    metrics.inc(c, nil, 2.5)
    metrics.inc(c, { code = 200, route = "catalog" })
    metrics.inc(c, { route = "catalog", code = "200" }, 4)    -- the same label set, another order and type
    metrics.inc(c, { code = 404, route = "catalog" }, 0)
    assert.equal(3.5, metrics.value(c))
    assert.equal(5, metrics.value(c, { code = "200", route = "catalog" }))
    assert.equal(0, metrics.value(c, { code = 404, route = "catalog" }))
    assert.is_nil(metrics.value(c, { code = 500, route = "catalog" }))
    local parsed = parse()
    assert.equal("counter", parsed.families[c:gsub("_total$", "")].type)
    assert.equal("Requests served.", parsed.families[c:gsub("_total$", "")].help)
    assert.equal(3.5, sample(parsed, c:gsub("_total$", ""), c))
    assert.equal(5, sample(parsed, c:gsub("_total$", ""), c, { code = "200", route = "catalog" }))
    assert.matches("\n" .. c .. '{code="200",route="catalog"} 5\n', parsed.text, 1, true)
  end)

  it("keeps gauges with set and add", function()
    local g = fresh("queue_depth")
    metrics.describe(g, "gauge", "Depth of a queue.")
    metrics.set(g, { queue = "a" }, 7)
    metrics.add(g, { queue = "a" }, -2)
    metrics.add(g, { queue = "b" }, 0.25)
    metrics.set(g, nil, -1e-3)
    assert.equal(5, metrics.value(g, { queue = "a" }))
    assert.equal(0.25, metrics.value(g, { queue = "b" }))
    local parsed = parse()
    assert.equal("gauge", parsed.families[g].type)
    assert.equal(5, sample(parsed, g, g, { queue = "a" }))
    assert.equal(0.25, sample(parsed, g, g, { queue = "b" }))
    assert.equal(-1e-3, sample(parsed, g, g))
  end)

  it("fills histogram buckets cumulatively, with +Inf, _sum and _count", function()
    local h, d = fresh("op_seconds"), fresh("default_seconds")
    metrics.describe(h, "histogram", "Operation time.", { buckets = { 0.5, 1, 2 } })
    metrics.describe(d, "histogram", "Default buckets.")
    for _, v in ipairs({ 0.1, 0.5, 0.7, 1.5, 3, 30 }) do metrics.observe(h, { op = "bind" }, v) end
    metrics.observe(d, nil, 0.003)
    local count, sum = metrics.value(h, { op = "bind" })
    assert.equal(6, count)
    close_to(35.8, sum, 1e-9)
    local parsed = parse()
    assert.equal("histogram", parsed.families[h].type)
    for le, n in pairs({ ["0.5"] = 2, ["1"] = 3, ["2"] = 4, ["+Inf"] = 6 }) do
      assert.equal(n, sample(parsed, h, h .. "_bucket", { op = "bind", le = le }), le)
    end
    assert.equal(4 + 2, nsamples(parsed, h))                 -- 4 buckets, _sum and _count, nothing else
    close_to(35.8, sample(parsed, h, h .. "_sum", { op = "bind" }), 1e-9)
    assert.equal(6, sample(parsed, h, h .. "_count", { op = "bind" }))
    local les = {}
    for _, s in ipairs(parsed.families[d].samples) do
      if s.name == d .. "_bucket" then les[#les + 1] = s.labels.le .. "=" .. s.value end
    end
    assert.same({ "0.005=1.0", "0.01=1.0", "0.025=1.0", "0.05=1.0", "0.1=1.0", "0.25=1.0", "0.5=1.0", "1=1.0",
      "2.5=1.0", "5=1.0", "10=1.0", "+Inf=1.0" }, les)
  end)

  it("escapes label values and help text, and sorts labels by name", function()
    local c = fresh("escapes_total")
    local nasty = 'quote " backslash \\ newline \n end, é ✓'
    metrics.describe(c, "counter", "Help with a backslash \\ and a\nnewline.")
    metrics.inc(c, { zeta = "z", alpha = nasty, mid = 1.5 })
    local parsed = parse()
    assert.matches(c .. '{alpha="quote \\" backslash \\\\ newline \\n end, é ✓",mid="1.5",zeta="z"} 1\n',
      parsed.text, 1, true)
    assert.matches("# HELP " .. c .. " Help with a backslash \\\\ and a\\nnewline.\n", parsed.text, 1, true)
    local base = c:gsub("_total$", "")
    assert.equal("Help with a backslash \\ and a\nnewline.", parsed.families[base].help)
    assert.equal(1, sample(parsed, base, c, { alpha = nasty, mid = "1.5", zeta = "z" }))
    assert.equal(1, metrics.value(c, { mid = "1.5", alpha = nasty, zeta = "z" }))
  end)

  it("is idempotent when described again identically, and refuses another kind, buckets or oldest", function()
    local c, h, g = fresh("idem_total"), fresh("idem_seconds"), fresh("idem_members")
    metrics.describe(c, "counter", "Idempotent.")
    metrics.inc(c, nil, 3)
    metrics.describe(c, "counter", "Idempotent.")
    metrics.describe(c, "counter", "Reworded help.")
    assert.equal(3, metrics.value(c))
    assert.equal("Reworded help.", parse().families[c:gsub("_total$", "")].help)
    metrics.describe(h, "histogram", "H.", { buckets = { 1, 2 } })
    metrics.describe(h, "histogram", "H.", { buckets = { 1, 2 } })
    metrics.describe(g, "gauge", "G.", { oldest = g .. "_oldest" })
    metrics.describe(g, "gauge", "G.", { oldest = g .. "_oldest" })
    metrics.describe(g .. "_oldest", "gauge", "Age of the oldest.")
    for _, call in ipairs({
      function() metrics.describe(c, "gauge", "Idempotent.") end,
      function() metrics.describe(h, "histogram", "H.") end,
      function() metrics.describe(h, "histogram", "H.", { buckets = { 1, 3 } }) end,
      function() metrics.describe(g, "gauge", "G.") end,
      function() metrics.describe(g, "gauge", "G.", { oldest = g .. "_other" }) end,
      function() metrics.describe(fresh("x"), "gauge", "X.", { oldest = c }) end,
      function() metrics.describe("process_threads", "gauge", "Mine.") end,
      function() metrics.describe("forge_metrics_series_dropped_total", "counter", "Mine.") end,
    }) do
      assert.error_matches(call, "metrics%.describe%(name, .*is described already")
    end
  end)

  it("raises with a usage string on misuse", function()
    local c, g, h, t = fresh("misuse_total"), fresh("misuse_gauge"), fresh("misuse_seconds"), fresh("misuse_members")
    metrics.describe(c, "counter", "C.")
    metrics.describe(g, "gauge", "G.")
    metrics.describe(h, "histogram", "H.")
    metrics.describe(t, "gauge", "T.")
    metrics.set(g, nil, 1)
    metrics.track(t, "m", {})
    local too_many = {}
    for i = 1, metrics.MAX_LABELS + 1 do too_many["l" .. i] = "v" end
    for _, case in ipairs({
      { "'spec_nope' is not described", function() metrics.inc("spec_nope") end },
      { "value%(name, labels|nil%): 'spec_nope' is not described", function() metrics.value("spec_nope") end },
      { "is not a counter", function() metrics.inc(g) end },
      { "n must be a finite number >= 0", function() metrics.inc(c, nil, -1) end },
      { "finite number", function() metrics.inc(c, nil, math.huge) end },
      { "set%(name, labels|nil, v%): '" .. c .. "' is not a gauge set with set/add", function() metrics.set(c, nil, 1) end },
      { "add%(.*'" .. t .. "' is not a gauge set with set/add", function() metrics.add(t, nil, 1) end },
      { "is not a histogram", function() metrics.observe(c, nil, 1) end },
      { "v must not be NaN", function() metrics.observe(h, nil, 0 / 0) end },
      { "not le on a histogram", function() metrics.observe(h, { le = "1" }, 1) end },
      { "track%(.*'" .. g .. "' is not a gauge used only with track", function() metrics.track(g, "m", {}) end },
      { "since needs a family described with opts.oldest", function() metrics.track(t, "m", {}, 1) end },
      { "forget%(name%): '" .. c .. "' is not a gauge used only with track", function() metrics.forget(c) end },
      { "label names match", function() metrics.inc(c, { ["1abc"] = "x" }) end },
      { "label names match", function() metrics.inc(c, { __reserved = "x" }) end },
      { "label names match", function() metrics.inc(c, { a = "\xff" }) end },     -- not UTF-8
      { "labels map names", function() metrics.inc(c, { [1] = "x" }) end },
      { "labels map names", function() metrics.inc(c, { a = {} }) end },
      { "at most 16 labels", function() metrics.inc(c, too_many) end },
      { "4096 bytes rendered", function() metrics.inc(c, { a = string.rep("x", 5000) }) end },
      { "NUL byte", function() metrics.inc(c, { a = "x\0y" }) end },
      { "name contains a NUL", function() metrics.inc(c .. "\0x") end },
      { "name and oldest match", function() metrics.describe("9lives", "counter", "x") end },
      { "name and oldest match", function() metrics.describe(string.rep("a", 201), "counter", "x") end },
      { "buckets are finite and strictly ascending", function()
        metrics.describe(fresh("b"), "histogram", "x", { buckets = { 1, 1 } }) end },
      { "strictly ascending", function() metrics.describe(fresh("b"), "histogram", "x", { buckets = { 1, math.huge } }) end },
      { "buckets must be an array of 1 to 64", function() metrics.describe(fresh("b"), "histogram", "x", { buckets = {} }) end },
      { "buckets must be an array of numbers", function()
        metrics.describe(fresh("b"), "histogram", "x", { buckets = { "1" } }) end },
      { "buckets are for histograms", function() metrics.describe(fresh("b"), "counter", "x", { buckets = { 1 } }) end },
      { "oldest is for gauges", function() metrics.describe(fresh("o"), "counter", "x", { oldest = "y" }) end },
      { "oldest is another name", function() local n = fresh("o"); metrics.describe(n, "gauge", "x", { oldest = n }) end },
      { "unknown option 'bucket'", function() metrics.describe(fresh("o"), "histogram", "x", { bucket = { 1 } }) end },
      { "invalid option 'summary'", function() metrics.describe(fresh("s"), "summary", "x") end },
      { "bad argument #3 to 'describe'", function() metrics.describe(fresh("s"), "gauge") end },
      { "bad argument #3 to 'set'", function() metrics.set(g, nil, "many") end },
      { "bad argument #2 to 'track'", function() metrics.track(t, nil, {}) end },
    }) do
      assert.error_matches(case[2], case[1])
    end
    -- nothing above changed a series
    assert.equal(1, metrics.value(g))
    assert.equal(1, metrics.value(t, {}))
    assert.is_nil(metrics.value(c))
  end)

  it("counts members by label set as track moves and removes them, and forget empties them", function()
    local t = fresh("instances")
    metrics.describe(t, "gauge", "Instances by plan and state.")
    for i = 1, 10 do metrics.track(t, "i" .. i, { plan = "small", state = "running" }) end
    for i = 11, 13 do metrics.track(t, "i" .. i, { plan = "large", state = "running" }) end
    metrics.track(t, "i1", { plan = "small", state = "running" })          -- again, unchanged: no double count
    metrics.track(t, "i2", { plan = "small", state = "failed" })           -- a move: old set -1, new +1
    metrics.track(t, "i3", nil)                                            -- removed
    metrics.track(t, "nobody", nil)                                        -- removing a non-member is no error
    assert.equal(8, metrics.value(t, { plan = "small", state = "running" }))
    assert.equal(1, metrics.value(t, { plan = "small", state = "failed" }))
    assert.equal(3, metrics.value(t, { plan = "large", state = "running" }))
    metrics.track(t, "i2", nil)
    local parsed = parse()
    assert.equal(0, sample(parsed, t, t, { plan = "small", state = "failed" }))   -- a set that had members stays, at 0
    assert.equal(8, sample(parsed, t, t, { plan = "small", state = "running" }))
    assert.equal(3, nsamples(parsed, t))
    metrics.forget(t)
    for _, labels in ipairs({ { plan = "small", state = "running" }, { plan = "large", state = "running" } }) do
      assert.equal(0, metrics.value(t, labels))
    end
    metrics.track(t, "i1", { plan = "small", state = "running" })          -- a re-seed starts from nothing
    metrics.track(t, "i11", { plan = "large", state = "running" })
    assert.equal(1, metrics.value(t, { plan = "small", state = "running" }))
    assert.equal(1, metrics.value(t, { plan = "large", state = "running" }))
  end)

  it("shows the age of the oldest member of each label set", function()
    local t = fresh("in_flight")
    local age = t .. "_oldest_seconds"
    metrics.describe(t, "gauge", "Operations in flight.", { oldest = age })
    local now = proc.time()
    metrics.track(t, "op1", { type = "provision" }, now - 100)
    metrics.track(t, "op2", { type = "provision" }, now - 40)
    metrics.track(t, "op3", { type = "bind" })                             -- since: now
    metrics.track(t, "op4", { type = "update" }, now - 5)
    metrics.track(t, "op4", nil)
    close_to(100, metrics.value(age, { type = "provision" }), 2)
    close_to(0, metrics.value(age, { type = "bind" }), 2)
    assert.is_nil(metrics.value(age, { type = "update" }))                 -- no members: not shown
    local parsed = parse()
    assert.equal("gauge", parsed.families[age].type)
    close_to(100, sample(parsed, age, age, { type = "provision" }), 2)
    close_to(0, sample(parsed, age, age, { type = "bind" }), 2)
    assert.equal(2, nsamples(parsed, age))
    assert.equal(0, sample(parsed, t, t, { type = "update" }))
    metrics.track(t, "op1", { type = "provision" })                        -- the same set again keeps its since
    close_to(100, metrics.value(age, { type = "provision" }), 2)
    metrics.track(t, "op1", { type = "provision" }, now - 10)              -- unless a new one is given
    close_to(40, metrics.value(age, { type = "provision" }), 2)
    metrics.track(t, "op2", { type = "bind" })                             -- a move starts again at now
    close_to(10, metrics.value(age, { type = "provision" }), 2)
    close_to(0, metrics.value(age, { type = "bind" }), 2)
    metrics.forget(t)
    assert.is_nil(metrics.value(age, { type = "provision" }))
    assert.equal(0, nsamples(parse(), age))
    assert.error_matches(function() metrics.set(age, nil, 1) end, "is not a gauge set with set/add")
    assert.error_matches(function() metrics.track(age, "x", {}) end, "is not a gauge used only with track")
  end)

  it("caps the series of a family and counts what it drops", function()
    local c, t = fresh("wide_total"), fresh("wide_members")
    local dropped = "forge_metrics_series_dropped_total"
    metrics.describe(c, "counter", "Many series.")
    metrics.describe(t, "gauge", "Many label sets.")
    for i = 1, metrics.MAX_SERIES do
      metrics.inc(c, { id = i })
      metrics.track(t, "m" .. i, { id = i })
    end
    metrics.inc(c, { id = "one too many" })
    metrics.inc(c, { id = "two too many" })
    metrics.inc(c, { id = 1 }, 2)                                          -- an existing series still counts
    metrics.track(t, "m1", { id = "beyond" })                              -- the move is dropped: m1 leaves
    assert.is_nil(metrics.value(c, { id = "one too many" }))
    assert.equal(3, metrics.value(c, { id = 1 }))
    assert.equal(2, metrics.value(dropped, { family = c }))
    assert.equal(1, metrics.value(dropped, { family = t }))
    assert.equal(0, metrics.value(t, { id = 1 }))
    local parsed = parse()
    assert.equal(metrics.MAX_SERIES, nsamples(parsed, c:gsub("_total$", "")))
    assert.equal(2, sample(parsed, dropped:gsub("_total$", ""), dropped, { family = c }))
  end)

  it("renders the process metrics from /proc/self", function()
    local parsed = parse()
    local function value(name) return sample(parsed, (name:gsub("_total$", "")), name) end
    local fds = -1                                                         -- less the one lfs.dir holds
    for e in lfs.dir("/proc/self/fd") do if e ~= "." and e ~= ".." then fds = fds + 1 end end
    close_to(fds, value("process_open_fds"), 2)                            -- python's pipe is not ours
    local max = value("process_max_fds")
    assert.is_true(max >= value("process_open_fds"))
    local sh = io.popen("ulimit -n")
    local limit = sh:read("l")
    sh:close()
    assert.equal(limit == "unlimited" and math.huge or tonumber(limit), max)
    assert.is_true(value("process_resident_memory_bytes") > 1e6)
    assert.is_true(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"))
    local start = value("process_start_time_seconds")
    assert.is_true(start <= proc.time() and start > proc.time() - 86400 * 365)
    for _, name in ipairs({ "process_cpu_seconds_total", "process_threads" }) do
      assert.equal(name == "process_threads" and "gauge" or "counter", parsed.families[name:gsub("_total$", "")].type)
    end
    -- CPU time grows as this process spins; threads grow as a server starts its pool
    local cpu, threads = value("process_cpu_seconds_total"), value("process_threads")
    local t0 = proc.monotonic()
    repeat until proc.monotonic() - t0 > 0.3
    parsed = parse()
    assert.is_true(value("process_cpu_seconds_total") >= cpu + 0.2)
    local srv = assert(require("forge.http").serve { listen = "127.0.0.1:0", handler = "spec.support.http_echo",
      threads = 4 })
    local ok, err = pcall(function()
      parsed = parse()
      assert.is_true(value("process_threads") >= threads + 4)
    end)
    srv:stop(1)
    assert(ok, err)
  end)

  it("is one registry for every worker state of forge.http, updated concurrently", function()
    local dir = assert(proc.run { argv = { "mktemp", "-d", "/tmp/forge-metrics-XXXXXX" } }).stdout:gsub("%s+$", "")
    local base = fresh("workers")
    local N, REQUESTS, MEMBERS = 20000, 8, 100
    files.write(dir .. "/spec_metrics_handler.lua", [[
      local metrics = require "forge.metrics"
      local proc = require "forge.proc"
      local N, MEMBERS, base = ]] .. N .. ", " .. MEMBERS .. [[, nil
      local M = {}
      function M.init(arg)        -- every worker state describes its families when it starts
        base = arg
        metrics.describe(base .. "_total", "counter", "Increments by parity.")
        metrics.describe(base .. "_gauge", "gauge", "Added to.")
        metrics.describe(base .. "_seconds", "histogram", "Observed.", { buckets = { 0.5, 1.5 } })
        metrics.describe(base .. "_members", "gauge", "Members by state.", { oldest = base .. "_oldest" })
      end
      function M.handle(req)
        local r = req.uri:match("^/(%d+)$")
        local t0 = proc.monotonic()
        for i = 1, N do
          metrics.inc(base .. "_total", { parity = i % 2 == 0 and "even" or "odd" })
          metrics.add(base .. "_gauge", nil, 1)
          metrics.observe(base .. "_seconds", nil, i % 3)
          metrics.track(base .. "_members", r .. ":" .. i % MEMBERS, { state = tostring(i % 5) })
        end
        return 200, nil, string.format('{"t0":%.6f,"t1":%.6f}', t0, proc.monotonic())
      end
      return M
    ]])
    local saved_path = package.path
    package.path = dir .. "/?.lua;" .. package.path                       -- http.serve hands it to every worker
    local srv, err = require("forge.http").serve { listen = "127.0.0.1:0", handler = "spec_metrics_handler",
      init = base, threads = 4 }
    package.path = saved_path
    finally(function()
      if srv then srv:stop(5) end
      os.execute("rm -rf '" .. dir .. "'")
    end)
    assert(srv, tostring(err))
    local cmds = {}
    for r = 1, REQUESTS do
      cmds[r] = string.format("curl -s --max-time 60 http://127.0.0.1:%d/%d &", srv:port(), r)
    end
    local p = io.popen("{ " .. table.concat(cmds, " ") .. " wait; }")
    local out = p:read("a")
    p:close()
    local spans = {}
    for obj in out:gmatch("%b{}") do spans[#spans + 1] = cjson.decode(obj) end
    assert.equal(REQUESTS, #spans, out)
    local overlapped = false                                               -- the updates really ran at once
    for i = 1, #spans do
      for j = i + 1, #spans do
        if spans[i].t0 < spans[j].t1 and spans[j].t0 < spans[i].t1 then overlapped = true end
      end
    end
    assert.is_true(overlapped, "no two requests ran at the same time")

    -- the spec's own state reads what the workers wrote, with no update lost
    assert.equal(REQUESTS * N / 2, metrics.value(base .. "_total", { parity = "odd" }))
    assert.equal(REQUESTS * N / 2, metrics.value(base .. "_total", { parity = "even" }))
    assert.equal(REQUESTS * N, metrics.value(base .. "_gauge"))
    local count, sum = metrics.value(base .. "_seconds")
    local per_request = 0
    for i = 1, N do per_request = per_request + i % 3 end
    assert.equal(REQUESTS * N, count)
    assert.equal(REQUESTS * per_request, sum)
    local expected = {}                    -- a member's state is the one of the last i it saw
    for k = 0, MEMBERS - 1 do
      local last = k == 0 and N or N - MEMBERS + k
      expected[last % 5] = (expected[last % 5] or 0) + REQUESTS
    end
    local parsed = parse()
    for state = 0, 4 do
      assert.equal(expected[state] or 0, metrics.value(base .. "_members", { state = tostring(state) }))
      assert.equal(expected[state] or 0, sample(parsed, base .. "_members", base .. "_members", { state = tostring(state) }))
    end
    assert.equal(REQUESTS * N / 2, sample(parsed, base, base .. "_total", { parity = "odd" }))
    assert.equal(REQUESTS * N, sample(parsed, base .. "_seconds", base .. "_seconds_count"))
    assert.equal(5, nsamples(parsed, base .. "_oldest"))
  end)
end)
