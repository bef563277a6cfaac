// A minimal chat on phi3.hpp: reads one user message per line from stdin and streams each reply.
// The session (and so its KV cache) is reused across turns.
//
//   ./chat [MODEL_DIR]        (without MODEL_DIR: the built-in demo model)
//
// Build: g++ -std=c++17 -Iinclude -Iexamples/cpp examples/cpp/chat.cpp -Ltarget/debug -lphi3

#include "phi3.hpp"

#include <cstdio>
#include <iostream>
#include <string>

int main(int argc, char **argv) {
    try {
        phi3::Model model = argc > 1 ? phi3::Model::load(argv[1]) : phi3::Model::demo();
        phi3::Session session = model.session();
        phi3::GenerateOptions options;
        options.max_tokens = 128;

        std::string line;
        while (std::getline(std::cin, line)) {
            if (line.find_first_not_of(" \t\r") == std::string::npos) {
                continue;
            }
            session.append_message("user", line);
            phi3::GenerateResult reply =
                session.generate(options, [](std::string_view text, int32_t) {
                    std::cout.write(text.data(), static_cast<std::streamsize>(text.size()));
                    std::cout.flush();
                    return true;
                });
            std::cout << "\n[" << reply.generated_tokens << " tokens, "
                      << phi3::to_string(reply.finish_reason) << "]" << std::endl;
        }
        return 0;
    } catch (const phi3::Error &e) {
        std::cerr << "error: " << e.status_name() << ": " << e.what() << "\n";
        return 1;
    }
}
