// Runs a fuzz target without libFuzzer (gcc builds, ctest): every file of the corpus directories
// given on the command line, then N pseudo-random mutations of them. Crashes fail the test.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

int main(int argc, char** argv) {
    std::vector<std::string> inputs;
    long mutations = 100000;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a.rfind("--mutations=", 0) == 0) {
            mutations = std::stol(a.substr(12));
            continue;
        }
        for (const auto& e : std::filesystem::directory_iterator(a)) {
            std::ifstream f(e.path(), std::ios::binary);
            inputs.emplace_back(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
        }
    }
    for (const auto& in : inputs) {
        LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(in.data()), in.size());
    }
    std::mt19937_64 rng(20261122);
    for (long i = 0; i < mutations && !inputs.empty(); ++i) {
        std::string s = inputs[rng() % inputs.size()];
        const int edits = 1 + static_cast<int>(rng() % 8);
        for (int k = 0; k < edits; ++k) {
            switch (rng() % 4) {
                case 0:
                    if (!s.empty()) {
                        s[rng() % s.size()] = static_cast<char>(rng());
                    }
                    break;
                case 1:
                    s.insert(s.begin() + static_cast<long>(rng() % (s.size() + 1)), static_cast<char>(rng()));
                    break;
                case 2:
                    if (!s.empty()) {
                        s.erase(rng() % s.size(), 1);
                    }
                    break;
                default:
                    s.resize(rng() % (s.size() + 1));
                    break;
            }
        }
        LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(s.data()), s.size());
    }
    std::printf("replayed %zu corpus inputs and %ld mutations: no crash\n", inputs.size(), mutations);
    return 0;
}
