-- wrk script for the OpenBao rows of the keybroker benchmark (bench/openbao.py drives it).
-- Every request is the same POST: JSON body from the file named by BENCH_BODY_FILE, token from
-- BENCH_TOKEN. At the end one line "RESULT {json}" reports counts and latency percentiles (µs).
-- wrk counts non-2xx/3xx answers in errors.status, so refused requests are never successes.

local function read_all(path)
  local fh = assert(io.open(path, "rb"))
  local data = fh:read("*a")
  fh:close()
  return data
end

wrk.method = "POST"
wrk.body = read_all(assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set"))
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Vault-Token"] = assert(os.getenv("BENCH_TOKEN"), "BENCH_TOKEN is not set")

function done(summary, latency, _requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format(
    'RESULT {"requests":%d,"errors":%d,"status_errors":%d,"seconds":%.6f,' ..
    '"p50_us":%.1f,"p99_us":%.1f}\n',
    summary.requests, errors, e.status, summary.duration / 1e6,
    latency:percentile(50.0), latency:percentile(99.0)))
end
