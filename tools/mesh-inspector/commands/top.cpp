#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "commands.hpp"

namespace evmesh::inspector {

namespace {

// Set by the signal handlers, read by the loop; the handlers also write a byte to the self-pipe
// so that the loop's poll() wakes up whichever thread the signal was delivered to.
std::atomic<bool> g_stop{false};
std::atomic<bool> g_resized{false};
std::atomic<bool> g_continued{false};
int g_wake[2] = {-1, -1};
// The terminal as it was before top changed it, for the handlers (set before they are installed).
termios g_saved_termios{};
std::atomic<bool> g_raw{false};     // stdin is in top's raw mode
std::atomic<bool> g_screen{false};  // the alternate screen is active, cursor hidden

constexpr char enter_screen[] = "\x1b[?1049h\x1b[?25l";  // alternate screen, hide the cursor
constexpr char leave_screen[] = "\x1b[?25h\x1b[?1049l";  // show the cursor, main screen

bool write_all(int fd, const char* p, std::size_t n) {  // async-signal-safe
    while (n > 0) {
        const auto w = ::write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return false;
        }
        p += w;
        n -= static_cast<std::size_t>(w);
    }
    return true;
}

void wake() {
    if (g_wake[1] >= 0) {
        const char c = 0;
        [[maybe_unused]] const auto ignored = ::write(g_wake[1], &c, 1);
    }
}

// Puts the terminal back as it was; async-signal-safe (used by the handlers too).
void restore_terminal() {
    if (g_screen.exchange(false)) {
        write_all(STDOUT_FILENO, leave_screen, sizeof(leave_screen) - 1);
    }
    if (g_raw.exchange(false)) {
        ::tcsetattr(STDIN_FILENO, TCSADRAIN, &g_saved_termios);
    }
}

// Non-canonical, no echo; ISIG stays on so that Ctrl-C, Ctrl-Z and Ctrl-\ still send signals.
bool enter_raw() {
    termios t = g_saved_termios;
    t.c_lflag &= ~static_cast<tcflag_t>(ICANON | ECHO);
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    if (::tcsetattr(STDIN_FILENO, TCSADRAIN, &t) != 0) {
        return false;
    }
    g_raw = true;
    return true;
}

void enter_screen_mode() {
    write_all(STDOUT_FILENO, enter_screen, sizeof(enter_screen) - 1);
    g_screen = true;
}

extern "C" void on_stop_signal(int) {
    g_stop = true;
    wake();
}

extern "C" void on_winch(int) {
    g_resized = true;
    wake();
}

// Ctrl-Z: give the shell its terminal back, stop; on SIGCONT the loop sets it up again.
extern "C" void on_tstp(int) {
    const int saved_errno = errno;
    const bool was_raw = g_raw.load(), was_screen = g_screen.load();
    restore_terminal();
    ::kill(::getpid(), SIGSTOP);
    // continued
    g_continued = was_raw || was_screen;
    wake();
    errno = saved_errno;
}

// Installs the handlers; restores the previous ones and closes the self-pipe when destroyed.
// The terminal is restored on every way out of run_top: return, exception, SIGINT, SIGTERM,
// SIGHUP, SIGQUIT (the handlers only ask the loop to stop).
class terminal_session {
public:
    terminal_session(bool screen, bool keys) {
        if (::pipe2(g_wake, O_CLOEXEC | O_NONBLOCK) != 0) {
            g_wake[0] = g_wake[1] = -1;
        }
        if (keys && ::tcgetattr(STDIN_FILENO, &g_saved_termios) != 0) {
            keys = false;
        }
        keys_ = keys;
        install(SIGINT, on_stop_signal);
        install(SIGTERM, on_stop_signal);
        install(SIGHUP, on_stop_signal);
        install(SIGQUIT, on_stop_signal);
        if (screen) {
            install(SIGWINCH, on_winch);
            install(SIGTSTP, on_tstp);
        }
        if (keys_ && !enter_raw()) {
            keys_ = false;
        }
        if (screen) {
            enter_screen_mode();
        }
    }
    ~terminal_session() {
        restore_terminal();
        for (const auto& [sig, old] : old_) {
            ::sigaction(sig, &old, nullptr);
        }
        for (int& fd : g_wake) {
            if (fd >= 0) {
                ::close(fd);
                fd = -1;
            }
        }
    }
    terminal_session(const terminal_session&) = delete;
    terminal_session& operator=(const terminal_session&) = delete;

    bool keys() const { return keys_; }

    // After SIGCONT: raw mode and the alternate screen again.
    void resume(bool screen) {
        if (keys_) {
            enter_raw();
        }
        if (screen) {
            enter_screen_mode();
        }
    }

private:
    void install(int sig, void (*handler)(int)) {
        struct sigaction sa {};
        sa.sa_handler = handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESTART;
        struct sigaction old {};
        if (::sigaction(sig, &sa, &old) == 0) {
            old_.emplace_back(sig, old);
        }
    }

    bool keys_ = false;
    std::vector<std::pair<int, struct sigaction>> old_;
};

enum class sort_key { rate, drops, latency, name };

const char* sort_name(sort_key k) {
    switch (k) {
        case sort_key::rate: return "rate";
        case sort_key::drops: return "drops";
        case sort_key::latency: return "latency";
        case sort_key::name: return "name";
    }
    return "";
}

// Names and topics come from the mesh: no control characters reach the terminal.
std::string sanitize(std::string s) {
    for (auto& c : s) {
        const auto u = static_cast<unsigned char>(c);
        if (u < 0x20 || u == 0x7f) {
            c = '?';
        }
    }
    return s;
}

// Display columns of UTF-8 text (one per code point).
std::size_t columns(const std::string& s) {
    std::size_t n = 0;
    for (const char c : s) {
        n += (static_cast<unsigned char>(c) & 0xC0) != 0x80 ? 1 : 0;
    }
    return n;
}

// The first `width` columns of `s`, cut on a code point boundary.
std::string fit(const std::string& s, std::size_t width) {
    std::size_t n = 0;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) {
            if (n == width) {
                return s.substr(0, i);
            }
            ++n;
        }
    }
    return s;
}

struct screen_size {
    std::size_t cols = 80, rows = 24;
    bool operator==(const screen_size&) const = default;
};

screen_size query_size() {
    winsize ws{};
    screen_size s;
    if (::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0 && ws.ws_row > 0) {
        s.cols = ws.ws_col;
        s.rows = ws.ws_row;
    }
    return s;
}

double node_rate(const json& n) {
    const auto r = n.value("rates", json::object());
    return r.value("local_in", 0.0) + r.value("client_in", 0.0) + r.value("mesh_in", 0.0);
}

std::uint64_t node_drops(const json& n) {
    const auto c = n.value("counters", json::object());
    return c.value("subscriber_gaps", std::uint64_t{0}) + c.value("client_rejected", std::uint64_t{0});
}

// Events of each topic lost in the mesh: client events rejected on it plus subscriber gaps on it,
// summed over the nodes (lifetime counters of their latest stats).
std::map<std::string, std::uint64_t> topic_drops(const stats_collector& stats) {
    std::map<std::string, std::uint64_t> drops;
    auto add = [&](const json& by_topic) {
        if (!by_topic.is_object()) {
            return;
        }
        for (const auto& [topic, n] : by_topic.items()) {
            if (n.is_number_unsigned()) {
                drops[topic] += n.get<std::uint64_t>();
            }
        }
    };
    for (const auto& [id, s] : stats.latest()) {
        (void)id;
        add(s.value("rejected", json::object()).value("by_topic", json::object()));
        for (const auto& sub : s.value("subscribers", json::array())) {
            add(sub.value("gaps_by_topic", json::object()));
        }
    }
    return drops;
}

struct view_state {
    sort_key sort = sort_key::rate;
    bool help = false;
    bool keys = false;  // keys are read (stdin and stdout are a terminal)
};

constexpr const char* help_line = "keys: q/Esc quit  r rate  d drops  l latency (p99)  n name  ?/h help  Ctrl-L redraw";

// The frame's lines. `fit_rows` (screen mode) is the terminal height: the node and topic rows
// share it; 0 (plain mode) shows every node and up to 20 topics.
std::vector<std::string> build_frame(const mesh_options& o, const json& snap, const stats_collector& stats,
                                     const view_state& v, std::size_t fit_rows) {
    std::vector<json> nodes(snap["nodes"].begin(), snap["nodes"].end());
    std::vector<json> topics(snap["topics"].begin(), snap["topics"].end());
    const auto drops = topic_drops(stats);
    auto tdrops = [&](const json& t) {
        const auto it = drops.find(t.value("topic", ""));
        return it == drops.end() ? std::uint64_t{0} : it->second;
    };
    auto by_name = [](const json& a, const json& b, const char* key) {
        return a.value(key, "") < b.value(key, "");
    };
    std::stable_sort(nodes.begin(), nodes.end(), [&](const json& a, const json& b) {
        switch (v.sort) {
            case sort_key::rate:
                if (node_rate(a) != node_rate(b)) return node_rate(a) > node_rate(b);
                break;
            case sort_key::drops:
                if (node_drops(a) != node_drops(b)) return node_drops(a) > node_drops(b);
                break;
            case sort_key::latency: {
                const auto la = a.value("latency_p99_us", 0.0), lb = b.value("latency_p99_us", 0.0);
                if (la != lb) return la > lb;
                break;
            }
            case sort_key::name: break;
        }
        return by_name(a, b, "name");
    });
    // topics have no latency figure: `l` orders them by rate
    std::stable_sort(topics.begin(), topics.end(), [&](const json& a, const json& b) {
        if (v.sort == sort_key::drops && tdrops(a) != tdrops(b)) {
            return tdrops(a) > tdrops(b);
        }
        if (v.sort != sort_key::name) {
            const auto ra = a.value("rate", 0.0), rb = b.value("rate", 0.0);
            if (ra != rb) return ra > rb;
        }
        return by_name(a, b, "topic");
    });

    std::vector<std::string> lines;
    char line[1024];
    std::snprintf(line, sizeof(line), "mesh-inspector top   sort: %s   mesh '%s'   %zu nodes   %zu topics   %s",
                  sort_name(v.sort), sanitize(o.mesh).c_str(), nodes.size(), topics.size(),
                  v.keys ? "(q quits, ? keys)" : "(Ctrl-C quits)");
    lines.emplace_back(line);
    // rows for nodes and topics: the height minus title, 2 blank lines, 2 column headers, help
    std::size_t node_rows = nodes.size(), topic_rows = std::min<std::size_t>(topics.size(), 20);
    if (fit_rows != 0) {
        topic_rows = topics.size();
        const std::size_t fixed = 5 + (v.help ? 1 : 0);
        const std::size_t avail = fit_rows > fixed ? fit_rows - fixed : 0;
        if (node_rows + topic_rows > avail) {
            // topics keep what the nodes leave, and at least half of the rows when they need it
            node_rows = std::min(node_rows, std::max(avail > topic_rows ? avail - topic_rows : 0, (avail + 1) / 2));
            topic_rows = std::min(topic_rows, avail - node_rows);
        }
    }
    lines.emplace_back("");
    std::snprintf(line, sizeof(line), "%-20s %-9s %-9s %5s %10s %10s %10s %8s %8s %9s", "NODE", "HEALTH", "UPTIME",
                  "PEERS", "PUB/s", "MESH IN/s", "LOCAL OUT", "GAPS", "REJECTS", "p99 us");
    lines.emplace_back(line);
    for (std::size_t i = 0; i < node_rows; ++i) {
        const auto& n = nodes[i];
        const auto r = n.value("rates", json::object());
        const auto c = n.value("counters", json::object());
        std::snprintf(line, sizeof(line), "%-20s %-9s %-9s %5zu %10s %10s %10s %8llu %8llu %9.0f",
                      sanitize(n.value("name", "")).substr(0, 20).c_str(), sanitize(n.value("health", "")).c_str(),
                      human_duration_ms(n.value("uptime_ms", std::uint64_t{0})).c_str(),
                      n.value("peers", json::array()).size(),
                      human_rate(r.value("local_in", 0.0) + r.value("client_in", 0.0)).c_str(),
                      human_rate(r.value("mesh_in", 0.0)).c_str(), human_rate(r.value("local_out", 0.0)).c_str(),
                      static_cast<unsigned long long>(c.value("subscriber_gaps", 0ULL)),
                      static_cast<unsigned long long>(c.value("client_rejected", 0ULL)),
                      n.value("latency_p99_us", 0.0));
        lines.emplace_back(line);
    }
    if (node_rows < nodes.size()) {
        std::snprintf(line, sizeof(line), "... %zu more nodes", nodes.size() - node_rows);
        lines.emplace_back(line);
    } else {
        lines.emplace_back("");
    }
    std::snprintf(line, sizeof(line), "%-40s %10s %8s  %-30s %s", "TOPIC", "RATE", "DROPS", "PUBLISHED ON",
                  "SUBSCRIBED ON");
    lines.emplace_back(line);
    for (std::size_t i = 0; i < topic_rows; ++i) {
        const auto& t = topics[i];
        std::string pubs, subs;
        for (const auto& p : t["publishers"]) {
            pubs += (pubs.empty() ? "" : ",") + p.value("node", "");
        }
        for (const auto& s : t["subscribers"]) {
            subs += (subs.empty() ? "" : ",") + s.get<std::string>();
        }
        std::snprintf(line, sizeof(line), "%-40s %10s %8llu  %-30s %s",
                      sanitize(t.value("topic", "")).substr(0, 40).c_str(), human_rate(t.value("rate", 0.0)).c_str(),
                      static_cast<unsigned long long>(tdrops(t)), sanitize(pubs).substr(0, 30).c_str(),
                      subs.empty() ? "-" : sanitize(subs).c_str());
        lines.emplace_back(line);
    }
    if (fit_rows != 0 && v.help) {
        while (lines.size() + 1 < fit_rows) {
            lines.emplace_back("");
        }
        lines.emplace_back(help_line);
    }
    return lines;
}

// Screen mode: home, each line cut to the width and cleared to its end, at most `size.rows`
// lines, no newline after the last row (it would scroll); `full` clears the whole screen first.
std::string render_screen(const std::vector<std::string>& lines, screen_size size, bool full) {
    std::string out = full ? "\x1b[H\x1b[2J" : "\x1b[H";
    const std::size_t n = std::min(lines.size(), size.rows);
    for (std::size_t i = 0; i < n; ++i) {
        const auto l = fit(lines[i], size.cols);
        out += l;
        if (columns(l) < size.cols) {
            out += "\x1b[K";  // not on a full line: at the last column it would erase the last character
        }
        if (i + 1 < n) {
            out += "\r\n";
        }
    }
    if (n < size.rows) {
        out += "\r\n\x1b[J";  // the rows below: a row of their own, nothing to scroll
    }
    return out;
}

std::string render_plain(const std::vector<std::string>& lines) {
    std::string out;
    for (const auto& l : lines) {
        out += l;
        out += '\n';
    }
    out += '\n';
    return out;
}

enum class key_action { none, redraw, full_redraw, quit };

// Applies the keys in `buf`; Esc alone quits, escape sequences (arrows, function keys) are skipped.
key_action apply_keys(const char* buf, std::size_t n, view_state& v) {
    key_action a = key_action::none;
    for (std::size_t i = 0; i < n; ++i) {
        const char c = buf[i];
        switch (c) {
            case 'q': case 'Q': case 3: return key_action::quit;
            case 27:
                if (i + 1 == n) {
                    return key_action::quit;
                }
                if (buf[i + 1] == '[' || buf[i + 1] == 'O') {
                    i += 2;
                    while (i < n && (buf[i] < 0x40 || buf[i] > 0x7e)) {
                        ++i;
                    }
                }
                break;
            case 'r': case 'R': v.sort = sort_key::rate; a = std::max(a, key_action::redraw); break;
            case 'd': case 'D': v.sort = sort_key::drops; a = std::max(a, key_action::redraw); break;
            case 'l': case 'L': v.sort = sort_key::latency; a = std::max(a, key_action::redraw); break;
            case 'n': case 'N': v.sort = sort_key::name; a = std::max(a, key_action::redraw); break;
            case '?': case 'h': case 'H': v.help = !v.help; a = std::max(a, key_action::redraw); break;
            case 12: a = key_action::full_redraw; break;  // Ctrl-L
            default: break;
        }
    }
    return a;
}

bool all_have_stats(node& self, const stats_collector& stats) {
    const auto peers = self.peers();
    const auto latest = stats.latest();
    return !peers.empty() && std::all_of(peers.begin(), peers.end(), [&](const auto& p) {
               return p.observer || latest.count(p.id) != 0;
           });
}

}  // namespace

// A live view with plain ANSI escapes (works in any terminal, tmux, script). On a terminal it is
// full-screen (alternate screen, keys, resize); piped, it prints one plain snapshot per second.
int run_top(const mesh_options& o, double duration_s) {
    auto self = join_mesh(o);
    if (!self) {
        return exit_usage;
    }
    stats_collector stats(*self);
    g_stop = false;
    g_resized = false;
    g_continued = false;
    const bool screen = ::isatty(STDOUT_FILENO) == 1;
    terminal_session term(screen, screen && ::isatty(STDIN_FILENO) == 1);
    bool stdin_open = term.keys();

    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const auto end = start + std::chrono::milliseconds(static_cast<std::int64_t>(duration_s * 1000));
    // the first stats events arrive within a second: do not draw an empty mesh first
    const auto first_deadline = start + std::chrono::milliseconds(std::min(o.wait_ms, 1500));
    const auto settle = std::min(first_deadline, start + std::chrono::milliseconds(900));
    bool started = false, full = true, draw_now = false;
    auto next_draw = start;
    view_state v;
    v.keys = stdin_open;
    screen_size size = screen ? query_size() : screen_size{};

    if (screen) {
        const auto waiting = render_screen({v.keys ? "mesh-inspector top   waiting for the nodes' stats ...   (q quits)"
                                                   : "mesh-inspector top   waiting for the nodes' stats ...   (Ctrl-C quits)"},
                                           size, true);
        write_all(STDOUT_FILENO, waiting.data(), waiting.size());
    }
    while (!g_stop) {
        auto now = clock::now();
        if (duration_s > 0 && now >= end) {
            break;
        }
        if (!started && (now >= first_deadline || (now >= settle && all_have_stats(*self, stats)))) {
            started = true;
            draw_now = true;
        }
        if (g_continued.exchange(false)) {
            term.resume(screen);
            full = draw_now = true;
        }
        if (screen && (g_resized.exchange(false) || !(query_size() == size))) {
            size = query_size();
            full = draw_now = true;
        }
        if (started && (draw_now || now >= next_draw)) {
            const auto snap = mesh_snapshot(*self, stats);
            const auto out = screen ? render_screen(build_frame(o, snap, stats, v, size.rows), size, full)
                                    : render_plain(build_frame(o, snap, stats, v, 0));
            if (!write_all(STDOUT_FILENO, out.data(), out.size())) {
                break;  // stdout closed (a pipe whose reader left, with SIGPIPE ignored)
            }
            full = draw_now = false;
            if (now >= next_draw) {
                next_draw = now + std::chrono::seconds(1);
            }
        }
        // wait for the next frame, a key, a signal or the end
        now = clock::now();
        auto until = started ? next_draw : std::min(first_deadline, now + std::chrono::milliseconds(20));
        if (duration_s > 0) {
            until = std::min(until, end);
        }
        const auto wait_ms = std::chrono::duration_cast<std::chrono::milliseconds>(until - now).count();
        pollfd fds[2] = {{g_wake[0], POLLIN, 0}, {stdin_open ? STDIN_FILENO : -1, POLLIN, 0}};
        const int r = ::poll(fds, 2, static_cast<int>(std::clamp<std::int64_t>(wait_ms + 1, 0, 1000)));
        if (r <= 0) {
            continue;  // timeout or EINTR
        }
        if (fds[0].revents & POLLIN) {
            char drain[64];
            while (::read(g_wake[0], drain, sizeof(drain)) > 0) {
            }
        }
        if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            char buf[64];
            const auto n = ::read(STDIN_FILENO, buf, sizeof(buf));
            if (n <= 0) {
                if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
                    stdin_open = false;  // the terminal went away; SIGHUP or --duration ends top
                }
                continue;
            }
            const auto a = apply_keys(buf, static_cast<std::size_t>(n), v);
            if (a == key_action::quit) {
                break;
            }
            if (a != key_action::none) {
                draw_now = true;
                full = full || a == key_action::full_redraw;
            }
        }
    }
    return exit_ok;  // ~terminal_session restores the terminal
}

}  // namespace evmesh::inspector
