--- A due-time schedule: each member (a string) has at most one due time, and `pop(now)` hands
-- out the members due by `now`, earliest first. A binary min-heap with lazy removal: moving or
-- removing a member leaves its old entry in the heap, skipped when it surfaces.
local Schedule = {}
Schedule.__index = Schedule

function Schedule.new() return setmetatable({ times = {}, members = {}, due = {} }, Schedule) end

local function swap(s, i, j)
  s.times[i], s.times[j] = s.times[j], s.times[i]
  s.members[i], s.members[j] = s.members[j], s.members[i]
end

local function sift_up(s, i)
  while i > 1 do
    local parent = i // 2
    if s.times[parent] <= s.times[i] then return end
    swap(s, i, parent)
    i = parent
  end
end

local function sift_down(s, i)
  local n = #s.times
  while true do
    local least, l, r = i, 2 * i, 2 * i + 1
    if l <= n and s.times[l] < s.times[least] then least = l end
    if r <= n and s.times[r] < s.times[least] then least = r end
    if least == i then return end
    swap(s, i, least)
    i = least
  end
end

local function drop_top(s)
  local n = #s.times
  swap(s, 1, n)
  s.times[n], s.members[n] = nil, nil
  sift_down(s, 1)
end

--- Make `member` due at time `t` (moving it if it was scheduled).
function Schedule:set(member, t)
  self.due[member] = t
  local n = #self.times + 1
  self.times[n], self.members[n] = t, member
  sift_up(self, n)
end

function Schedule:has(member) return self.due[member] ~= nil end

function Schedule:remove(member) self.due[member] = nil end

--- The next member due by `now` (taken off the schedule), or nil.
function Schedule:pop(now)
  while self.times[1] do
    local t, member = self.times[1], self.members[1]
    if self.due[member] ~= t then
      drop_top(self)                           -- moved or removed since
    elseif t > now then
      return nil
    else
      drop_top(self)
      self.due[member] = nil
      return member
    end
  end
  return nil
end

return Schedule
