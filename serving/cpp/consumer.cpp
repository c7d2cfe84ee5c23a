// avp_consumer: runs a serving package the way the vehicle's C++ stack would, with LibTorch only.
//
//   avp_consumer PACKAGE_DIR [--runs N] [--warmup N] [--threads N]
//                [--runtime default|torchscript|aoti|int8|all]
//
// 1. Reads the example cloud (example_input.bin: float32 [N, 4], little-endian raw) and what the
//    trained model produced for it (expected_output.bin: int64 classes [N]; expected_logits.bin:
//    float32 [N, K]). N and K follow from the file sizes (metadata.json records the same shapes; a
//    JSON parser is not needed here).
// 2. Loads model.ts (frozen TorchScript) with torch::jit::load and, when the package's model.pt2 is an
//    AOTInductor package (metadata.json says "format": "aoti"), model.pt2 with AOTIModelPackageLoader;
//    model_int8.pt2 (the int8 program, carried when the evaluation chose it) likewise. The default,
//    --runtime default, runs the one metadata.json names in runtimes.default.serve_runtime (the variant
//    the evaluation chose to serve; TorchScript when it names none); --runtime all runs every one.
// 3. Runs each on the example and compares with the expected output: the exact class match rate, the
//    points whose class differs although the expected top-2 logit margin is above the tolerance (real
//    mismatches, not near-ties), and the max absolute logit difference. The tolerance is the one the
//    packager used: 1e-4 * max(1, max |expected logit|). The int8 program is compared with its own
//    logits on the example (int8_expected_logits.bin), not the float model's.
// 4. Times N runs (p50/p99 in ms).
//
// Output: one "key=value ..." line per runtime and a final "RESULT: OK" or "RESULT: MISMATCH".
// Exit status: 0 all match, 1 a mismatch, 2 usage or input error.
//
// Verify the package first (sha256sum -c MANIFEST.sha256 in its folder, or serving.load in Python):
// this program trusts the files it is given.

#include <torch/script.h>
#include <torch/headeronly/version.h>  // TORCH_VERSION
#include <ATen/Parallel.h>             // at::set_num_threads

#ifdef AVP_WITH_AOTI
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr double kRelativeTolerance = 1e-4;  // same as serving/package.py RELATIVE_TOLERANCE

struct Options {
  std::string package;
  int runs = 20;
  int warmup = 2;
  int threads = 0;  // 0: LibTorch's default
  std::string runtime = "default";
};

struct Example {
  int64_t points = 0;
  int64_t classes = 0;
  at::Tensor input;            // [1, N, 4] float32
  at::Tensor valid;            // [1, N] bool
  at::Tensor expected_classes; // [N] int64
  at::Tensor expected_logits;  // [N, K] float32
};

struct Comparison {
  double class_match_rate = 0.0;
  int64_t real_mismatches = 0;
  int64_t near_tie_flips = 0;
  double max_abs_diff = 0.0;
  double tolerance = 0.0;
  bool ok = false;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "avp_consumer: " << message << "\n"
            << "usage: avp_consumer PACKAGE_DIR [--runs N] [--warmup N] [--threads N] "
               "[--runtime default|torchscript|aoti|int8|all]\n";
  std::exit(2);
}

Options parse_args(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&](const char* name) -> std::string {
      if (i + 1 >= argc) usage_error(std::string(name) + " needs a value");
      return argv[++i];
    };
    auto number = [&](const char* name) -> int {
      std::string text = value(name);
      try {
        size_t used = 0;
        int parsed = std::stoi(text, &used);
        if (used != text.size() || parsed < 0) throw std::invalid_argument(text);
        return parsed;
      } catch (const std::exception&) {
        usage_error(std::string(name) + " expects a non-negative integer, got '" + text + "'");
      }
    };
    if (arg == "--runs") {
      options.runs = std::max(1, number("--runs"));
    } else if (arg == "--warmup") {
      options.warmup = number("--warmup");
    } else if (arg == "--threads") {
      options.threads = number("--threads");
    } else if (arg == "--runtime") {
      options.runtime = value("--runtime");
      if (options.runtime != "default" && options.runtime != "torchscript" && options.runtime != "aoti" &&
          options.runtime != "int8" && options.runtime != "all")
        usage_error("--runtime is default, torchscript, aoti, int8 or all, got '" + options.runtime + "'");
    } else if (arg == "-h" || arg == "--help") {
      usage_error("help");
    } else if (!arg.empty() && arg[0] == '-') {
      usage_error("unknown option " + arg);
    } else if (options.package.empty()) {
      options.package = arg;
    } else {
      usage_error("one package folder only, got a second: " + arg);
    }
  }
  if (options.package.empty()) usage_error("missing PACKAGE_DIR");
  return options;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bool little_endian_host() {
  const uint16_t probe = 1;
  unsigned char first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

// A tensor that owns a copy of raw little-endian bytes.
at::Tensor tensor_from_bytes(const std::vector<char>& bytes, at::IntArrayRef shape, at::ScalarType dtype) {
  auto view = torch::from_blob(const_cast<char*>(bytes.data()), shape, at::TensorOptions().dtype(dtype));
  return view.clone();
}

Example read_example(const std::string& dir) {
  const auto input = read_file(dir + "/example_input.bin");
  const auto classes = read_file(dir + "/expected_output.bin");
  const auto logits = read_file(dir + "/expected_logits.bin");
  if (input.empty() || input.size() % 16 != 0)
    throw std::runtime_error("example_input.bin: " + std::to_string(input.size()) +
                             " bytes is not N x 4 float32 (a non-zero multiple of 16)");
  Example example;
  example.points = static_cast<int64_t>(input.size() / 16);
  if (classes.size() != static_cast<size_t>(example.points) * 8)
    throw std::runtime_error("expected_output.bin: " + std::to_string(classes.size()) + " bytes, expected " +
                             std::to_string(example.points * 8) + " (N int64 classes)");
  const size_t per_class = static_cast<size_t>(example.points) * 4;
  if (logits.empty() || logits.size() % per_class != 0)
    throw std::runtime_error("expected_logits.bin: " + std::to_string(logits.size()) +
                             " bytes is not N x K float32");
  example.classes = static_cast<int64_t>(logits.size() / per_class);
  example.input = tensor_from_bytes(input, {1, example.points, 4}, at::kFloat);
  example.valid = torch::ones({1, example.points}, at::TensorOptions().dtype(at::kBool));
  example.expected_classes = tensor_from_bytes(classes, {example.points}, at::kLong);
  example.expected_logits = tensor_from_bytes(logits, {example.points, example.classes}, at::kFloat);
  return example;
}

// The runtime metadata.json names in runtimes.default ("serve_runtime": "torchscript" | "pt2" | "int8"), as
// this program calls it (pt2 is aoti); torchscript when the package names none.
std::string default_runtime(const std::string& dir) {
  const auto bytes = read_file(dir + "/metadata.json");
  const std::string text(bytes.begin(), bytes.end());
  const std::string key = "\"serve_runtime\": \"";
  const size_t at = text.find(key);
  if (at == std::string::npos) return "torchscript";
  const size_t start = at + key.size();
  const std::string value = text.substr(start, text.find('"', start) - start);
  if (value == "pt2") return "aoti";
  if (value == "torchscript" || value == "int8") return value;
  throw std::runtime_error("metadata.json: unknown runtimes.default.serve_runtime '" + value + "'");
}

bool file_exists(const std::string& path) { return static_cast<bool>(std::ifstream(path)); }

// The example with the int8 program's own logits (and their argmax) as the expected output.
Example int8_example(const Example& example, const std::string& dir) {
  const auto logits = read_file(dir + "/int8_expected_logits.bin");
  if (logits.size() != static_cast<size_t>(example.points * example.classes) * 4)
    throw std::runtime_error("int8_expected_logits.bin: " + std::to_string(logits.size()) +
                             " bytes, expected N x K float32 like expected_logits.bin");
  Example int8 = example;
  int8.expected_logits = tensor_from_bytes(logits, {example.points, example.classes}, at::kFloat);
  int8.expected_classes = int8.expected_logits.argmax(-1);
  return int8;
}

bool package_has_aoti(const std::string& dir) {
  // Read from metadata.json's runtimes.pt2 entry (runtimes.int8 is AOTInductor too). json.dump(indent=2)
  // writes exactly this for an AOTInductor .pt2 (the fallback writes "exported_program", which LibTorch
  // cannot run).
  const auto bytes = read_file(dir + "/metadata.json");
  const std::string text(bytes.begin(), bytes.end());
  const size_t entry = text.find("\"pt2\": {");
  if (entry == std::string::npos) return false;
  const std::string key = "\"format\": \"";
  const size_t at = text.find(key, entry);
  return at != std::string::npos && text.compare(at + key.size(), 5, "aoti\"") == 0;
}

Comparison compare(const at::Tensor& logits_batch, const Example& example) {
  Comparison result;
  const at::Tensor expected = example.expected_logits;
  if (logits_batch.dim() != 3 || logits_batch.size(0) != 1 || logits_batch.size(1) != example.points ||
      logits_batch.size(2) != example.classes) {
    std::ostringstream shape;
    shape << logits_batch.sizes();
    throw std::runtime_error("model output has shape " + shape.str() + ", expected [1, " +
                             std::to_string(example.points) + ", " + std::to_string(example.classes) + "]");
  }
  const at::Tensor logits = logits_batch[0].to(at::kFloat).contiguous();
  result.tolerance = kRelativeTolerance * std::max(1.0, expected.abs().max().item<double>());
  result.max_abs_diff = (logits - expected).abs().max().item<double>();
  const at::Tensor classes = logits.argmax(-1);
  const at::Tensor differs = classes.ne(example.expected_classes);
  const at::Tensor top2 = std::get<0>(expected.topk(2, -1));
  const at::Tensor margin = top2.select(1, 0) - top2.select(1, 1);
  const at::Tensor real = differs.logical_and(margin.gt(2 * result.tolerance));
  result.real_mismatches = real.sum().item<int64_t>();
  const int64_t flipped = differs.sum().item<int64_t>();
  result.near_tie_flips = flipped - result.real_mismatches;
  result.class_match_rate = 1.0 - static_cast<double>(flipped) / static_cast<double>(example.points);
  result.ok = std::isfinite(result.max_abs_diff) && result.max_abs_diff <= result.tolerance &&
              result.real_mismatches == 0;
  return result;
}

template <typename Forward>
std::vector<double> time_runs(Forward forward, int warmup, int runs) {
  for (int i = 0; i < warmup; ++i) forward();
  std::vector<double> ms;
  ms.reserve(runs);
  for (int i = 0; i < runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    forward();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  return ms;
}

// Linear interpolation between order statistics, like numpy.percentile's default.
double percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const double rank = q / 100.0 * static_cast<double>(values.size() - 1);
  const size_t low = static_cast<size_t>(std::floor(rank));
  const size_t high = std::min(values.size() - 1, low + 1);
  return values[low] + (values[high] - values[low]) * (rank - static_cast<double>(low));
}

bool report(const std::string& runtime, const Example& example, const Comparison& c,
            const std::vector<double>& ms) {
  std::cout << std::setprecision(6) << "runtime=" << runtime << " points=" << example.points
            << " classes=" << example.classes << " class_match_rate=" << std::fixed << c.class_match_rate
            << std::defaultfloat << " real_mismatches=" << c.real_mismatches
            << " near_tie_flips=" << c.near_tie_flips << " max_abs_logit_diff=" << c.max_abs_diff
            << " tolerance=" << c.tolerance << " p50_ms=" << percentile(ms, 50) << " p99_ms=" << percentile(ms, 99)
            << " runs=" << ms.size() << " match=" << (c.ok ? "yes" : "no") << std::endl;
  return c.ok;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_args(argc, argv);
  if (!little_endian_host()) {
    std::cerr << "avp_consumer: the package's raw arrays are little-endian; this host is not\n";
    return 2;
  }
  if (options.threads > 0) at::set_num_threads(options.threads);
  Example example;
  try {
    example = read_example(options.package);
  } catch (const std::exception& error) {
    std::cerr << "avp_consumer: " << error.what() << "\n";
    return 2;
  }
  std::cout << "package=" << options.package << " threads=" << at::get_num_threads() << " torch=" << TORCH_VERSION
            << std::endl;

  bool all_ok = true;
  int ran = 0;
  try {
    c10::InferenceMode inference;  // no autograd bookkeeping: what a deployed model runs under
    std::string runtime = options.runtime;
    if (runtime == "default") {
      runtime = default_runtime(options.package);
      std::cout << "default_runtime=" << runtime << std::endl;
    }
    const bool all = runtime == "all";
    if (runtime == "torchscript" || all) {
      torch::jit::Module module = torch::jit::load(options.package + "/model.ts", at::kCPU);
      module.eval();
      std::vector<c10::IValue> inputs{example.input, example.valid};
      const at::Tensor logits = module.forward(inputs).toTensor();
      const Comparison c = compare(logits, example);
      const auto ms = time_runs([&] { return module.forward(inputs); }, options.warmup, options.runs);
      all_ok = report("torchscript", example, c, ms) && all_ok;
      ++ran;
    }
    // AOTInductor programs: model.pt2, and model_int8.pt2 where the package carries it.
    for (const std::string name : {"aoti", "int8"}) {
      if (runtime != name && !all) continue;
      const bool is_int8 = name == std::string("int8");
      const std::string file = options.package + (is_int8 ? "/model_int8.pt2" : "/model.pt2");
      const bool present = is_int8 ? file_exists(file) : package_has_aoti(options.package);
      if (!present) {
        if (!all) {
          std::cerr << "avp_consumer: this package has no AOTInductor " << (is_int8 ? "model_int8.pt2" : "model.pt2")
                    << " (see runtimes in metadata.json)\n";
          return 2;
        }
        if (!is_int8) std::cout << "runtime=aoti skipped=model.pt2-is-not-an-AOTInductor-package" << std::endl;
        continue;
      }
#ifdef AVP_WITH_AOTI
      const Example expected = is_int8 ? int8_example(example, options.package) : example;
      torch::inductor::AOTIModelPackageLoader loader(file);
      const std::vector<at::Tensor> inputs{example.input, example.valid};
      const at::Tensor logits = loader.run(inputs).at(0);
      const Comparison c = compare(logits, expected);
      const auto ms = time_runs([&] { return loader.run(inputs); }, options.warmup, options.runs);
      all_ok = report(name, expected, c, ms) && all_ok;
      ++ran;
#else
      std::cout << "runtime=" << name << " skipped=built-without-AVP_WITH_AOTI" << std::endl;
#endif
    }
  } catch (const c10::Error& error) {
    std::cerr << "avp_consumer: LibTorch error: " << error.what_without_backtrace() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "avp_consumer: " << error.what() << "\n";
    return 2;
  }
  if (ran == 0) {
    std::cerr << "avp_consumer: nothing ran\n";
    return 2;
  }
  std::cout << (all_ok ? "RESULT: OK" : "RESULT: MISMATCH") << std::endl;
  return all_ok ? 0 : 1;
}
