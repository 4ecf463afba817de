-- wrk script of `abstream bench ingest`: replay a pool of pre-generated request bodies (closed loop).
--
-- Environment (set by abstream/bench/loadgen.py run_wrk):
--   ABSTREAM_WRK_POOL     pool file: "<length>\n<body>" repeated (loadgen.write_pool)
--   ABSTREAM_WRK_GZIP     "1": the bodies are gzip, send Content-Encoding: gzip
--   ABSTREAM_WRK_THREADS  wrk's -t, so that thread k takes bodies k, k+T, k+2T, ... (no two threads
--                         post the same body at the same time; the gateway would flag a duplicate)
-- Every request is formatted once in init(): request() only returns a prepared string, so the Lua cost per
-- request is a table lookup. response() counts 200s and the "accepted" / "duplicates" of each answer
-- (events_per_s counts accepted events that were not duplicates: the ones published to Kafka);
-- done() prints one line "ABSTREAM_WRK_JSON {...}" that loadgen.py parses.

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   local path = assert(os.getenv("ABSTREAM_WRK_POOL"), "ABSTREAM_WRK_POOL is not set")
   local nthreads = tonumber(os.getenv("ABSTREAM_WRK_THREADS") or "1")
   local headers = { ["Content-Type"] = "application/json" }
   if os.getenv("ABSTREAM_WRK_GZIP") == "1" then
      headers["Content-Encoding"] = "gzip"
   end
   local f = assert(io.open(path, "rb"))
   requests_pool = {}
   local i = 0
   while true do
      local line = f:read("*l")
      if not line then break end
      local body = f:read(tonumber(line))
      if i % nthreads == tid then
         requests_pool[#requests_pool + 1] = wrk.format("POST", nil, headers, body)
      end
      i = i + 1
   end
   f:close()
   assert(#requests_pool > 0, "empty pool")
   idx = 0
   ok = 0
   bad = 0
   accepted = 0
   duplicates = 0
end

function request()
   idx = idx + 1
   if idx > #requests_pool then idx = 1 end
   return requests_pool[idx]
end

function response(status, headers, body)
   if status == 200 then
      ok = ok + 1
      accepted = accepted + (tonumber(body:match('"accepted":(%d+)')) or 0)
      duplicates = duplicates + (tonumber(body:match('"duplicates":(%d+)')) or 0)
   else
      bad = bad + 1
   end
end

function done(summary, latency, requests)
   local t_ok, t_bad, t_acc, t_dup = 0, 0, 0, 0
   for _, thread in ipairs(threads) do
      t_ok = t_ok + thread:get("ok")
      t_bad = t_bad + thread:get("bad")
      t_acc = t_acc + thread:get("accepted")
      t_dup = t_dup + thread:get("duplicates")
   end
   local s = summary.duration / 1e6
   local e = summary.errors
   io.write(string.format(
      'ABSTREAM_WRK_JSON {"mode":"max","requests":%d,"ok":%d,"non_200":%d,"accepted_events":%d,"duplicates":%d,' ..
      '"elapsed_s":%.3f,"rps":%.1f,"events_per_s":%.1f,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_ms":{"p50":%.3f,"p90":%.3f,"p95":%.3f,"p99":%.3f,"p999":%.3f,"max":%.3f,"mean":%.3f}}\n',
      summary.requests, t_ok, t_bad, t_acc, t_dup, s, t_ok / s, (t_acc - t_dup) / s,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(95) / 1000,
      latency:percentile(99) / 1000, latency:percentile(99.9) / 1000, latency.max / 1000, latency.mean / 1000))
end
