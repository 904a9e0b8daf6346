-- The dashboard in a real browser (docs/dashboard.md): Debian's headless Chromium loads the pages
-- from a running broker. Checked: what each page shows, that no secret is in any page, that
-- values from the platform are escaped, that the action forms act only with their page's token
-- and from the same site, and the two faces of the OSB dashboard_url (page / JSON).
-- FORGE_DASHBOARD_SCREENSHOT=file.png keeps a copy of the screenshot the spec takes.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"
local lfs = require "lfs"
local proc = require "forge.proc"

local D = Broker.dummy
local R = Broker.redis
local STUCK = Broker.stuck
local CHROMIUM = "/usr/bin/chromium"

-- Pids of live processes whose command line names `dir` (a Chromium profile).
local function pids_using(dir)
  local pids = {}
  for entry in lfs.dir("/proc") do
    local f = entry:match("^%d+$") and io.open("/proc/" .. entry .. "/cmdline", "rb")
    if f then
      local cmdline = f:read("a") or ""
      f:close()
      if cmdline:find(dir, 1, true) then pids[#pids + 1] = tonumber(entry) end
    end
  end
  return pids
end

-- Run headless Chromium on `url` with extra flags, in a temp profile it may not outlive: its
-- stdout. Anything it left running is killed and fails the test.
local function chromium(url, flags)
  local profile = Broker.tmpdir()
  local argv = { CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--user-data-dir=" .. profile }
  for _, f in ipairs(flags or {}) do argv[#argv + 1] = f end
  argv[#argv + 1] = url
  local r, err = proc.run { argv = argv, timeout = 90, cwd = profile,
    env = { HOME = profile, PATH = os.getenv("PATH"), TMPDIR = profile } }
  local left = pids_using(profile)
  for _, pid in ipairs(left) do
    local start = proc.identity(pid)
    if start then proc.kill(pid, start, "KILL") end
  end
  os.execute("rm -rf '" .. profile .. "'")
  assert(r, err and err.message)
  assert.same({}, left)
  assert.equal(0, r.code, r.stderr)
  return r.stdout
end

-- Every string under `v` (an instance's secrets, a binding's credentials).
local function strings(v, out)
  if type(v) == "string" then out[#out + 1] = v
  elseif type(v) == "table" then for _, x in pairs(v) do strings(x, out) end end
  return out
end

local function count(text, pattern)
  local n = 0
  for _ in text:gmatch(pattern) do n = n + 1 end
  return n
end

describe("the dashboard", function()
  local b, secrets
  local function browse(path) return "http://" .. b.admin_user .. ":" .. b.admin_password .. "@127.0.0.1:" .. b.port .. path end

  -- The DOM of a dashboard page as Chromium built it; it holds no secret.
  local function dom(path)
    local html = chromium(browse(path), { "--dump-dom" })
    assert.truthy(html:find("<html", 1, true), html)
    for _, s in ipairs(secrets) do assert.is_nil(html:find(s, 1, true), "a secret is in " .. path) end
    return html
  end

  local function admin_request(method, path, opts)
    opts = opts or {}
    opts.user, opts.password = b.admin_user, b.admin_password
    return client.request(method, b:url(path), opts)
  end

  -- A form's token as the page carries it.
  local function token(html, action_path)
    local pattern = '<form action="' .. action_path:gsub("%p", "%%%0") ..
      '"[^>]*><input name="token" type="hidden" value="(%x+)">'
    return html:match(pattern)
  end

  local function post(path, body, headers)
    local h = { ["Content-Type"] = "application/x-www-form-urlencoded" }
    for k, v in pairs(headers or {}) do h[k] = v end
    return admin_request("POST", path, { body = body, headers = h })
  end

  local SAME_SITE = function() return { Origin = "http://127.0.0.1:" .. b.port, ["Sec-Fetch-Site"] = "same-origin" } end

  setup(function()
    b = Broker.start { fixtures = true, pool = 20,
      config = "targets:\n  local:\n    deploy_timeout: 3600\nquotas:\n  organization: 10\n" }
    b:provision_async("d1", D.service, D.small, "o1", "s1")
    b:provision_async("d2", D.service, D.small, "o2", "s1",
      { platform = "cloudfoundry", note = "<script>alert('pwned')</script>" })
    b:provision_async("r1", R.service, R.one, "o2", "s1")
    b:provision_async("st1", STUCK.service, STUCK.plan, "o1", "s1")
    for _, id in ipairs({ "d1", "d2", "r1" }) do
      assert.equal("succeeded", b:wait_operation("/v2/service_instances/" .. id, 60).state)
    end
    local s1, _, _, k1 = b:call("PUT", "/v2/service_instances/d1/service_bindings/k1",
      { service_id = D.service, plan_id = D.small })
    local s2, _, _, rk1 = b:call("PUT", "/v2/service_instances/r1/service_bindings/rk1",
      { service_id = R.service, plan_id = R.one })
    assert.equal(201, s1)
    assert.equal(201, s2)
    secrets = strings(b:instance("r1").secrets, {})
    assert.is_true(#secrets > 0)
    strings({ k1.credentials.password, rk1.credentials.password, rk1.credentials.uri }, secrets)
  end)
  teardown(function() b:cleanup() end)

  it("answers only the admin credentials", function()
    assert.equal(401, (client.request("GET", b:url("/dashboard"))))
    assert.equal(401, (client.request("GET", b:url("/dashboard"), { user = b.admin_user, password = "wrong" })))
    local status, body, headers = client.request("GET", b:url("/dashboard"), { user = b.user, password = b.password })
    assert.equal(401, status)
    assert.equal("text/html; charset=utf-8", headers["content-type"])
    assert.truthy(headers["www-authenticate"])
    assert.truthy(body:find("missing or wrong admin credentials", 1, true))
    local ok, _, ok_headers = admin_request("GET", "/dashboard")
    assert.equal(200, ok)
    assert.equal("text/html; charset=utf-8", ok_headers["content-type"])
    assert.truthy(ok_headers["content-security-policy"]:find("frame-ancestors 'none'", 1, true))
  end)

  it("shows the overview: counts, operations in flight, refused edits and quota usage", function()
    local html = dom("/dashboard")
    assert.truthy(html:find("<title>Overview · Service Forge</title>", 1, true))
    assert.truthy(html:find('<a href="/dashboard/instances?plan=small&amp;service=dummy&amp;state=running">2</a>', 1, true))
    assert.truthy(html:find('<a href="/dashboard/instances?plan=1-server&amp;service=redis&amp;state=running">1</a>', 1,
      true))
    assert.truthy(html:find('<a href="/dashboard/instances?plan=forever&amp;service=stuck&amp;state=deploying">1</a>', 1,
      true))
    assert.truthy(html:find('<a href="/dashboard/instances?state=running">3</a>', 1, true))
    assert.truthy(html:find("Operations in flight (1)", 1, true))
    assert.truthy(html:find('<td><a href="/dashboard/instances/st1">st1</a></td><td>—</td><td>provision</td>', 1, true))
    assert.truthy(html:find("Refused service edits (0)", 1, true))
    assert.truthy(html:find("<td>organization</td><td>o1</td><td>instances</td>", 1, true))
    assert.truthy(html:find("2 of 10", 1, true))
  end)

  it("lists instances with filters and pages", function()
    local html = dom("/dashboard/instances")
    local ids = {}
    for id in html:gmatch('<td><a href="/dashboard/instances/([%w%-]+)">') do ids[#ids + 1] = id end
    assert.same({ "d1", "d2", "r1", "st1" }, ids)
    assert.truthy(html:find('<form action="/dashboard/instances" class="filters" method="get">', 1, true))

    html = dom("/dashboard/instances?service=dummy&limit=1")
    assert.equal(1, count(html, '<td><a href="/dashboard/instances/'))
    assert.truthy(html:find('<td><a href="/dashboard/instances/d1">d1</a></td>', 1, true))
    assert.truthy(html:find('<option selected="" value="dummy">dummy</option>', 1, true))
    local next_page = html:match('<a href="([^"]+)" rel="next">')
    assert.equal("/dashboard/instances?after=d1&amp;limit=1&amp;service=dummy", next_page)
    html = dom((next_page:gsub("&amp;", "&")))
    assert.truthy(html:find('<td><a href="/dashboard/instances/d2">d2</a></td>', 1, true))
    assert.equal(1, count(html, '<td><a href="/dashboard/instances/'))
    assert.truthy(html:find("First page", 1, true))
    assert.is_nil(html:find('rel="next"', 1, true))

    html = dom("/dashboard/instances?org=o2&state=running")
    ids = {}
    for id in html:gmatch('<td><a href="/dashboard/instances/([%w%-]+)">') do ids[#ids + 1] = id end
    assert.same({ "d2", "r1" }, ids)

    for _, q in ipairs({ "state=sleeping", "colour=blue", "limit=0" }) do
      local status, body, headers = admin_request("GET", "/dashboard/instances?" .. q)
      assert.equal(400, status, q)
      assert.equal("text/html; charset=utf-8", headers["content-type"])
      assert.truthy(body:find("<title>400 BadRequest", 1, true), q)
    end
  end)

  it("shows an instance: state, bindings without secrets, processes, version, deployment", function()
    local html = dom("/dashboard/instances/d1")
    assert.truthy(html:find("<h1>Instance d1</h1>", 1, true))
    assert.truthy(html:find('<span class="state state-running">running</span>', 1, true))
    assert.truthy(html:find("Bindings (1)", 1, true))
    assert.truthy(html:find("<td>k1</td>", 1, true))
    assert.truthy(html:find("<td>sleeper</td>", 1, true))
    local hash = b:instance("d1").script_hash
    assert.truthy(html:find("<dt>Pinned</dt><dd><code>" .. hash .. "</code></dd>", 1, true))
    assert.truthy(html:find("<dt>Upgrade available</dt><dd>no</dd>", 1, true))
    assert.truthy(html:find("<strong>provision</strong>", 1, true))
    assert.truthy(html:find("- sleep", 1, true))                         -- the rendered deployment
    -- restart is open to a running local instance; nothing to retry or cancel
    assert.truthy(html:find('<button name="action" type="submit" value="restart">', 1, true))
    assert.truthy(html:find('<button disabled="" name="action" type="submit" value="retry">', 1, true))

    html = dom("/dashboard/instances/r1")
    assert.truthy(html:find("<td>rk1</td>", 1, true))
    assert.truthy(html:find("<td>redis-0</td>", 1, true))
    assert.truthy(html:find("********", 1, true))                       -- masked, not shown
    assert.equal(404, (admin_request("GET", "/dashboard/instances/nope")))
    assert.equal(400, (admin_request("GET", "/dashboard/instances/a%20b")))
  end)

  it("shows values from the platform as text", function()
    local html = dom("/dashboard/instances/d2")
    assert.is_nil(html:find("<script>alert", 1, true))
    assert.truthy(html:find("&lt;script&gt;alert(", 1, true))
    assert.equal(1, count(html, "<script"))                            -- dashboard.js only
  end)

  it("cancels and retries from the instance page, only with its token and from the same site", function()
    assert.is_true(Broker.wait_for(function() return #Broker.marked_pids(b.state_dir, "st1") > 0 end, 15))
    local html = dom("/dashboard/instances/st1")
    assert.truthy(html:find('<button name="action" type="submit" value="cancel">Cancel provision</button>', 1, true))
    local cancel = token(html, "/dashboard/instances/st1/cancel")
    local retry = token(html, "/dashboard/instances/st1/retry")
    assert.is_string(cancel)
    assert.is_string(retry)
    local other = token(dom("/dashboard/instances/d1"), "/dashboard/instances/d1/cancel")

    -- refused: no token, another form's token, a cross-site request even with the token
    for _, try in ipairs({
      { "", { Origin = "http://evil.example", ["Sec-Fetch-Site"] = "cross-site" } },
      { "", {} },
      { "token=" .. other, {} },
      { "token=" .. cancel, { Origin = "http://evil.example" } },
      { "token=" .. cancel, { ["Sec-Fetch-Site"] = "cross-site" } },
    }) do
      local status, body, headers = post("/dashboard/instances/st1/cancel", try[1], try[2])
      assert.equal(403, status, body)
      assert.equal("text/html; charset=utf-8", headers["content-type"])
    end
    assert.is_nil(b:instance("st1").operation.cancel_requested)

    local status, _, headers = post("/dashboard/instances/st1/cancel", "token=" .. cancel, SAME_SITE())
    assert.equal(303, status)
    local location = headers.location
    assert.truthy(location:match("^/dashboard/instances/st1%?flash=cancel%%20accepted"), location)
    html = dom(location)
    assert.truthy(html:find('<p class="flash flash-done" role="status">cancel accepted: operation provision-', 1, true))
    -- a link with words of its own is refused
    assert.equal(400, (admin_request("GET", (location:gsub("flash=cancel", "flash=hello")))))

    assert.is_true(Broker.wait_for(function() return b:instance("st1").operation.state == "failed" end, 15))
    html = dom("/dashboard/instances/st1")
    assert.truthy(html:find('<span class="state state-failed">failed</span>', 1, true))
    assert.truthy(html:find("provision cancelled by the operator", 1, true))
    assert.truthy(html:find('<button name="action" type="submit" value="retry">Retry provision</button>', 1, true))

    status, _, headers = post("/dashboard/instances/st1/retry", "token=" .. retry .. "&action=retry")
    assert.equal(303, status)
    html = dom(headers.location)
    assert.truthy(html:find("retry accepted: operation provision-", 1, true))
    assert.equal("in progress", b:instance("st1").operation.state)
    assert.truthy(html:find("<strong>provision</strong> <span class=\"state state-in-progress\">in progress</span>",
      1, true))

    -- an action the admin API refuses: the page says why
    local d1_retry = token(dom("/dashboard/instances/d1"), "/dashboard/instances/d1/retry")
    status, _, headers = post("/dashboard/instances/d1/retry", "token=" .. d1_retry, SAME_SITE())
    assert.equal(303, status)
    html = dom(headers.location)
    assert.truthy(html:find('<p class="flash flash-refused" role="status">retry refused (422): ', 1, true))

    assert.equal(404, (post("/dashboard/instances/st1/explode", "token=" .. cancel)))
    assert.equal(405, (admin_request("GET", "/dashboard/instances/st1/cancel")))
  end)

  it("lists services with their versions and reload errors", function()
    local html = dom("/dashboard/services")
    assert.truthy(html:find("<td><strong>dummy</strong></td>", 1, true))
    local hash = b:instance("d1").script_hash
    assert.truthy(html:find('<code title="' .. hash .. '">' .. hash:sub(1, 12) .. "</code>", 1, true))
    assert.truthy(html:find("Reload errors (0)", 1, true))

    local dir = b.state_dir .. "/services/broken"
    assert(os.execute("mkdir -p '" .. dir .. "'"))
    local f = assert(io.open(dir .. "/service.lua", "w"))
    f:write("return { name = <b>\n")
    f:close()
    assert.is_true(Broker.wait_for(function()
      local _, _, _, body = b:call("GET", "/admin/services")
      return #body.errors > 0
    end, 15))
    html = dom("/dashboard/services")
    assert.truthy(html:find("Reload errors (1)", 1, true))
    assert.truthy(html:find("<td>broken</td><td><code>services/broken/service.lua:1: ", 1, true))
    assert.truthy(html:find("near '&lt;'", 1, true) or html:find("near &lt;", 1, true), html)
    assert.truthy(dom("/dashboard"):find("Refused service edits (1)", 1, true))
  end)

  it("shows what an update changed, and the fleet upgrades", function()
    local status, raw = b:call("PATCH", "/v2/service_instances/r1?accepts_incomplete=true",
      { service_id = R.service, parameters = { maxmemory_policy = "allkeys-lru" } })
    assert.is_true(status == 200 or status == 202, raw)
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/r1", 60).state)
    local html = dom("/dashboard/instances/r1")
    assert.truthy(html:find("What it changed (diff, secrets masked)", 1, true))
    assert.truthy(html:find("+        maxmemory-policy allkeys-lru", 1, true), html)
    html = dom("/dashboard/services")
    assert.truthy(html:find("<h2>Fleet upgrades</h2>", 1, true))
    assert.truthy(html:find("No fleet upgrade yet: forge upgrade starts one.", 1, true))
  end)

  it("answers the OSB dashboard_url with the page to a browser, with JSON to API clients", function()
    local _, _, _, fetched = b:call("GET", "/v2/service_instances/d1")
    assert.equal(b:url("/service_instances/d1"), fetched.dashboard_url)
    local html = dom("/service_instances/d1")
    assert.truthy(html:find("<h1>Instance d1</h1>", 1, true))
    assert.truthy(html:find("<td>k1</td>", 1, true))

    local status, _, headers, seed = b:call("GET", "/service_instances/d1")
    assert.equal(200, status)
    assert.equal("application/json", headers["content-type"])
    assert.equal("d1", seed.service_instance_id)
    status, _, headers, seed = b:call("GET", "/service_instances/d1", nil, { Accept = "text/html" })
    assert.equal(200, status)                                          -- the broker's credentials: JSON
    assert.equal("application/json", headers["content-type"])
    assert.equal("d1", seed.service_instance_id)
    assert.equal(401, (admin_request("GET", "/service_instances/d1")))  -- not a browser: the broker's API
    status, _, headers = admin_request("GET", "/service_instances/nope", { headers = { Accept = "text/html" } })
    assert.equal(404, status)
    assert.equal("text/html; charset=utf-8", headers["content-type"])
  end)

  it("renders an instance page in a screenshot", function()
    local dir = Broker.tmpdir()
    local png = dir .. "/r1.png"
    finally(function() os.execute("rm -rf '" .. dir .. "'") end)
    chromium(browse("/dashboard/instances/r1"), { "--screenshot=" .. png, "--window-size=1280,1800" })
    local f = assert(io.open(png, "rb"))
    local data = f:read("a")
    f:close()
    assert.equal("\137PNG\r\n\26\n", data:sub(1, 8))
    assert.equal("IHDR", data:sub(13, 16))
    local width, height = string.unpack(">I4I4", data, 17)
    assert.same({ 1280, 1800 }, { width, height })
    assert.is_true(#data > 20000)                 -- a page with content, not a blank one
    local keep = os.getenv("FORGE_DASHBOARD_SCREENSHOT")
    if keep then
      local out = assert(io.open(keep, "wb"))
      out:write(data)
      out:close()
    end
  end)
end)

describe("the dashboard with the admin API off", function()
  it("is not there", function()
    local b = Broker.start { env = { FORGE_ADMIN_PASSWORD = "" } }
    finally(function() b:cleanup() end)
    for _, path in ipairs({ "/dashboard", "/dashboard/instances", "/dashboard/services", "/dashboard/style.css" }) do
      local status, body, headers = client.request("GET", b:url(path), { user = b.user, password = b.password })
      assert.equal(404, status, path)
      assert.equal("text/html; charset=utf-8", headers["content-type"])
      assert.truthy(body:find("the admin API is off", 1, true))
    end
    local status, _, headers = client.request("GET", b:url("/service_instances/x"),
      { user = b.user, password = b.password, headers = { Accept = "text/html" } })
    assert.equal(404, status)
    assert.equal("application/json", headers["content-type"])
  end)
end)
