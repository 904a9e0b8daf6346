-- Loaded before every spec: make the in-tree modules and scripts reachable.
package.path = "scripts/?.lua;scripts/?/init.lua;spec/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
