std = "lua54"
max_line_length = 130
files["spec"] = { std = "+busted" }
files["services"] = { read_globals = { "forge" } }
files["spec/fixtures/services"] = { read_globals = { "forge" } }
exclude_files = { "build/" }
