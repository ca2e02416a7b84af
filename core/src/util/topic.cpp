#include <evmesh/codec.hpp>
#include <evmesh/topic.hpp>

namespace evmesh {

result<topic_pattern> topic_pattern::parse(std::string_view text) {
    if (text.empty() || text.size() > 255) {
        return fail(errc::bad_pattern);
    }
    topic_pattern p;
    p.text_ = std::string(text);
    std::size_t start = 0;
    bool literal = true;
    while (start <= text.size()) {
        const auto dot = text.find('.', start);
        const auto seg = text.substr(start, dot == std::string_view::npos ? dot : dot - start);
        if (seg.empty()) {
            return fail(errc::bad_pattern);
        }
        const bool last = dot == std::string_view::npos;
        if (seg == ">") {
            if (!last) {
                return fail(errc::bad_pattern);
            }
        } else if (seg != "*") {
            if (!valid_topic(seg)) {
                return fail(errc::bad_pattern);
            }
        }
        const bool wild = seg == "*" || seg == ">";
        if (literal && !wild) {
            p.prefix_.append(seg);
            if (!last) {
                p.prefix_.push_back('.');
            }
        } else {
            literal = false;
        }
        p.segments_.emplace_back(seg);
        if (last) {
            break;
        }
        start = dot + 1;
    }
    p.exact_ = literal;
    // "a.b.>" matches exactly the valid topics starting with "a.b."
    p.prefix_only_ = !literal && p.segments_.back() == ">"
                     && p.prefix_.size() + 1 == p.text_.size() && !p.prefix_.empty()
                     && !p.prefix_.starts_with("_evmesh");
    // reserved `_evmesh.` topics (stats, ping) only match patterns that name them literally
    p.system_ = p.segments_.front() == "_evmesh";
    return p;
}

bool topic_pattern::matches(std::string_view topic) const noexcept {
    if (exact_) {
        return topic == text_;
    }
    if (!system_ && topic.starts_with("_evmesh.")) {
        return false;
    }
    std::size_t pos = 0;
    for (std::size_t i = 0; i < segments_.size(); ++i) {
        const auto& seg = segments_[i];
        if (pos > topic.size()) {
            return false;
        }
        if (seg == ">") {
            return pos < topic.size();  // one or more segments remain
        }
        const auto dot = topic.find('.', pos);
        const auto end = dot == std::string_view::npos ? topic.size() : dot;
        const auto piece = topic.substr(pos, end - pos);
        if (piece.empty() || (seg != "*" && piece != seg)) {
            return false;
        }
        pos = end + 1;  // past the dot, or topic.size()+1 at the end
    }
    return pos == topic.size() + 1;
}

}  // namespace evmesh
