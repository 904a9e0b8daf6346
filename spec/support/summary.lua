-- busted output handler: the plain terminal output, plus the counts written to
-- $FORGE_SPEC_COUNTS ("passed failed") so spec/run can print one closing line.
return function(options)
  local busted = require 'busted'
  local handler = require 'busted.outputHandlers.gtest'(options)

  busted.subscribe({ 'suite', 'end' }, function()
    local path = os.getenv('FORGE_SPEC_COUNTS')
    if path then
      local f = assert(io.open(path, 'w'))
      f:write(string.format('%d %d\n', handler.successesCount,
        handler.failuresCount + handler.errorsCount))
      f:close()
    end
    return nil, true
  end)

  return handler
end
