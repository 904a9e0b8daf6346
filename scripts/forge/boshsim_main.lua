--- Entry point of the simulated BOSH director:
--   forge lua scripts/forge/boshsim_main.lua --listen 127.0.0.1:PORT --state DIR [...]   (see --help)
os.exit(require("forge.boshsim").main(arg or {}), true)
