-- wrk script of the HTTP matrix end-to-end test: each wrk thread stops its own event loop after
-- exactly WRK_LIMIT responses. Run with as many connections as threads (-tN -cN), so every
-- connection carries exactly WRK_LIMIT requests and none is left in flight: the number of
-- requests the server answered is then known exactly, not just bounded.
-- (wrk's main thread still sleeps the whole -d duration before it prints the summary.)
local count = 0
local limit = tonumber(os.getenv("WRK_LIMIT") or "100")

function response(status, headers, body)
  count = count + 1
  if count >= limit then
    wrk.thread:stop()
  end
end
