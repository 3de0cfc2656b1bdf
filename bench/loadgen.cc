// Closed-loop gRPC load generator for the keybroker benchmark (bench/run.py builds and drives it).
//
// Sends one pre-serialised request (a file of protobuf bytes, made by bench/run.py) to one method
// through grpc::GenericStub, so no protobuf code generation is needed. mTLS with the given CA,
// client certificate and key; optional bearer token. `--concurrency` calls are kept in flight,
// spread round-robin over `--connections` channels, each with its own TCP connection
// (GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL), so SO_REUSEPORT can spread them over server processes.
// One completion-queue thread: the client stays cheap next to the server it measures.
//
// `--unique-at OFFSET` makes every request distinct (GenerateDataKey registers each recording id
// once): the 20 bytes at OFFSET of the request (a placeholder the driver put in the recording id)
// are overwritten per call with 8 random hex digits (per process) and a 12-digit call counter.
//
// Bounded: warm-up, then a measured window of `--duration` seconds or `--max-calls` completions,
// whichever ends first; every call has a deadline. Protocol on stdout, one line each:
//   READY            all channels connected
//   MEASURE_START    the measured window begins (the driver snapshots server CPU now)
//   MEASURE_END      the measured window ends (and again)
//   RESULT {json}    counts, rate, latency percentiles, client CPU per call
// Exit status: 0 done (errors are counted, not fatal); 2 usage or connection failure.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;  // measurements; gRPC deadlines use system_clock

struct Options {
  std::string target;
  std::string ca_file, cert_file, key_file;
  std::string method;
  std::string request_file;
  std::string token_file;
  int concurrency = 16;
  int connections = 16;
  double warmup = 2.0;
  double duration = 10.0;
  long max_calls = 5'000'000;
  double call_timeout = 10.0;
  long unique_at = -1;
};

constexpr size_t kUniqueWidth = 20;

struct Call {
  grpc::ClientContext ctx;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> rpc;
  Clock::time_point started;
  int slot = 0;
};

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "loadgen: %s\n", message.c_str());
  std::exit(2);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) die("cannot read " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

Options parse(int argc, char** argv) {
  std::map<std::string, std::string> kv;
  for (int i = 1; i < argc; i += 2) {
    std::string flag = argv[i];
    if (flag.rfind("--", 0) != 0 || i + 1 >= argc) die("usage: loadgen --flag value ...");
    kv[flag.substr(2)] = argv[i + 1];
  }
  auto need = [&](const char* name) {
    auto it = kv.find(name);
    if (it == kv.end()) die(std::string("missing --") + name);
    return it->second;
  };
  auto opt = [&](const char* name, const std::string& fallback) {
    auto it = kv.find(name);
    return it == kv.end() ? fallback : it->second;
  };
  Options o;
  o.target = need("target");
  o.ca_file = need("ca");
  o.cert_file = need("cert");
  o.key_file = need("key");
  o.method = need("method");
  o.request_file = need("request");
  o.token_file = opt("token-file", "");
  o.concurrency = std::stoi(opt("concurrency", "16"));
  o.connections = std::stoi(opt("connections", "16"));
  o.warmup = std::stod(opt("warmup", "2"));
  o.duration = std::stod(opt("duration", "10"));
  o.max_calls = std::stol(opt("max-calls", "5000000"));
  o.call_timeout = std::stod(opt("call-timeout", "10"));
  o.unique_at = std::stol(opt("unique-at", "-1"));
  if (o.concurrency < 1 || o.concurrency > 4096) die("--concurrency must be 1..4096");
  if (o.connections < 1 || o.connections > o.concurrency) die("--connections must be 1..concurrency");
  if (o.duration <= 0 || o.duration > 600 || o.warmup < 0 || o.warmup > 60) die("bad duration");
  if (o.max_calls < 1) die("--max-calls must be >= 1");
  return o;
}

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out;
}

double percentile_us(std::vector<int64_t>& ns, double p) {
  if (ns.empty()) return 0.0;
  size_t k = static_cast<size_t>(p / 100.0 * static_cast<double>(ns.size() - 1));
  std::nth_element(ns.begin(), ns.begin() + static_cast<long>(k), ns.end());
  return static_cast<double>(ns[k]) / 1000.0;
}

void say(const char* line) {
  std::fputs(line, stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = read_file(o.ca_file);
  ssl.pem_cert_chain = read_file(o.cert_file);
  ssl.pem_private_key = read_file(o.key_file);
  auto creds = grpc::SslCredentials(ssl);
  const std::string request_bytes = read_file(o.request_file);
  std::string authorization;
  if (!o.token_file.empty()) {
    std::string token = read_file(o.token_file);
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
    authorization = "Bearer " + token;
  }

  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int i = 0; i < o.connections; ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("keybroker.bench.channel", i);  // distinct args: never share a subchannel
    auto channel = grpc::CreateCustomChannel(o.target, creds, args);
    if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
      die("cannot connect to " + o.target);
    }
    stubs.push_back(std::make_unique<grpc::GenericStub>(channel));
  }
  say("READY");

  if (o.unique_at >= 0 &&
      static_cast<size_t>(o.unique_at) + kUniqueWidth > request_bytes.size()) {
    die("--unique-at is past the end of the request");
  }
  char run_prefix[9];
  std::snprintf(run_prefix, sizeof run_prefix, "%08x",
                static_cast<unsigned>(std::random_device{}()));
  long long sequence = 0;
  auto make_request = [&]() {
    if (o.unique_at < 0) {
      grpc::Slice slice(request_bytes.data(), request_bytes.size());
      return grpc::ByteBuffer(&slice, 1);
    }
    std::string bytes = request_bytes;
    char unique[kUniqueWidth + 1];
    std::snprintf(unique, sizeof unique, "%s%012lld", run_prefix, sequence++ % 1000000000000LL);
    bytes.replace(static_cast<size_t>(o.unique_at), kUniqueWidth, unique, kUniqueWidth);
    grpc::Slice slice(bytes.data(), bytes.size());
    return grpc::ByteBuffer(&slice, 1);
  };
  grpc::CompletionQueue cq;
  const auto timeout = std::chrono::microseconds(static_cast<int64_t>(o.call_timeout * 1e6));

  auto start_call = [&](int slot) {
    auto* call = new Call;
    call->slot = slot;
    call->started = Clock::now();
    call->ctx.set_deadline(std::chrono::system_clock::now() + timeout);
    if (!authorization.empty()) call->ctx.AddMetadata("authorization", authorization);
    const grpc::ByteBuffer request = make_request();
    call->rpc = stubs[static_cast<size_t>(slot % o.connections)]->PrepareUnaryCall(
        &call->ctx, o.method, request, &cq);
    call->rpc->StartCall();
    call->rpc->Finish(&call->response, &call->status, call);
  };

  const auto t0 = Clock::now();
  const auto warm_end = t0 + std::chrono::microseconds(static_cast<int64_t>(o.warmup * 1e6));
  const auto window = std::chrono::microseconds(static_cast<int64_t>(o.duration * 1e6));
  // A hard stop well past the window, in case completions stop arriving altogether.
  const auto hard_stop = warm_end + window + timeout + std::chrono::seconds(5);
  Clock::time_point measure_start{}, measure_end{};
  enum { kWarmup, kMeasure, kDrain } phase = kWarmup;
  long ok = 0, errors = 0;
  double cpu_start = 0, cpu_end = 0;
  std::map<int, long> error_codes;
  std::string first_error;
  std::vector<int64_t> latencies;
  latencies.reserve(static_cast<size_t>(std::min<long>(o.max_calls, 4'000'000)));

  if (o.warmup == 0) {
    measure_start = Clock::now();
    cpu_start = cpu_seconds();
    phase = kMeasure;
    say("MEASURE_START");
  }
  for (int slot = 0; slot < o.concurrency; ++slot) start_call(slot);
  int outstanding = o.concurrency;

  while (outstanding > 0) {
    void* tag = nullptr;
    bool got = false;
    auto status = cq.AsyncNext(&tag, &got, std::chrono::system_clock::now() + std::chrono::seconds(1));
    if (status == grpc::CompletionQueue::SHUTDOWN) break;
    const auto now = Clock::now();
    if (now > hard_stop) die("calls stopped completing");
    if (status == grpc::CompletionQueue::TIMEOUT) continue;
    std::unique_ptr<Call> call(static_cast<Call*>(tag));

    if (phase == kWarmup && now >= warm_end) {
      phase = kMeasure;
      measure_start = now;
      cpu_start = cpu_seconds();
      say("MEASURE_START");
    }
    if (phase == kMeasure) {
      if (got && call->status.ok()) {
        ++ok;
        latencies.push_back(
            std::chrono::duration_cast<std::chrono::nanoseconds>(now - call->started).count());
      } else {
        ++errors;
        int code = got ? static_cast<int>(call->status.error_code()) : -1;
        ++error_codes[code];
        if (first_error.empty()) {
          first_error = std::to_string(code) + " " + call->status.error_message();
        }
      }
      if (now - measure_start >= window || ok + errors >= o.max_calls) {
        phase = kDrain;
        measure_end = now;
        cpu_end = cpu_seconds();
        say("MEASURE_END");
      }
    }
    if (phase == kDrain) {
      --outstanding;
    } else {
      start_call(call->slot);
    }
  }

  cq.Shutdown();
  {
    void* tag = nullptr;
    bool got = false;
    while (cq.Next(&tag, &got)) {
    }
  }

  const double seconds = std::chrono::duration<double>(measure_end - measure_start).count();
  const long calls = ok + errors;
  std::ostringstream codes;
  bool first = true;
  for (const auto& [code, n] : error_codes) {
    codes << (first ? "" : ",") << '"' << code << "\":" << n;
    first = false;
  }
  std::ostringstream out;
  out << "RESULT {\"calls\":" << calls << ",\"ok\":" << ok << ",\"errors\":" << errors
      << ",\"seconds\":" << seconds << ",\"rate\":" << (seconds > 0 ? ok / seconds : 0.0)
      << ",\"p50_us\":" << percentile_us(latencies, 50) << ",\"p99_us\":"
      << percentile_us(latencies, 99) << ",\"client_cpu_us_per_call\":"
      << (calls > 0 ? (cpu_end - cpu_start) * 1e6 / static_cast<double>(calls) : 0.0)
      << ",\"error_codes\":{" << codes.str() << "},\"first_error\":\""
      << json_escape(first_error) << "\"}";
  say(out.str().c_str());
  return 0;
}
