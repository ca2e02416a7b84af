// Request templates of the "http" channel plugin: the URL, header values, a JSON body and form
// fields, each rendered from the event with the escaping its target needs. The template language
// is the bridges' (bridge_common.hpp name_template: {topic}, {id}, {data.phone}, ...); what differs
// per target is only how a substituted value is escaped:
//   URL        values percent-encoded (RFC 3986 unreserved characters kept), so a value cannot
//              add a path segment, a query parameter or change the host; a URL template that is
//              one field alone ("{data.endpoint}") is taken as the whole URL
//   form       name=value pairs, application/x-www-form-urlencoded (literal text and values)
//   JSON       a JSON document (the settings' table) whose string leaves are templates; the
//              rendered strings are JSON-escaped when the document is written, so a value can
//              never break out of its string
//   headers    control characters removed (no CR/LF injection)
// Header-only so the unit test checks exactly what the plugin sends.
#pragma once

#include "bridge_common.hpp"
#include "http_common.hpp"

namespace evmesh::channels::http {

using bridge::event_fields;
using bridge::name_template;
using bridge::template_error;

// RFC 3986 section 2.3 unreserved characters.
inline bool unreserved(char c) noexcept {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_' || c == '~';
}

// Percent-encodes everything but the unreserved characters (UTF-8 bytes one by one).
inline void percent_encode(std::string& out, std::string_view value) {
    static const char hex[] = "0123456789ABCDEF";
    for (char c : value) {
        if (unreserved(c)) {
            out += c;
        } else {
            auto u = static_cast<unsigned char>(c);
            out += '%';
            out += hex[u >> 4];
            out += hex[u & 15];
        }
    }
}

// application/x-www-form-urlencoded (WHATWG URL, "urlencoded serializer"): alphanumerics and
// *-._ as they are, space as '+', every other byte percent-encoded.
inline void form_encode(std::string& out, std::string_view value) {
    static const char hex[] = "0123456789ABCDEF";
    for (char c : value) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '*' || c == '-' ||
            c == '.' || c == '_') {
            out += c;
        } else if (c == ' ') {
            out += '+';
        } else {
            auto u = static_cast<unsigned char>(c);
            out += '%';
            out += hex[u >> 4];
            out += hex[u & 15];
        }
    }
}

// Control characters removed: the value of a header line.
inline void header_escape(std::string& out, std::string_view value) { out += header_safe(value); }

// Parses a template setting, refusing the likely mistake "{{data.phone}}": in this syntax that is
// the literal text "{data.phone}", never the field.
inline name_template parse_template(settings& s, const std::string& key, const std::string& text) {
    name_template t;
    try {
        t = name_template(text);
    } catch (const template_error& e) {
        s.fail(key, e.what());
    }
    for (size_t open = text.find("{{"); open != std::string::npos; open = text.find("{{", open + 2)) {
        size_t close = text.find("}}", open + 2);
        if (close == std::string::npos) break;
        std::string inner = text.substr(open + 2, close - open - 2);
        if (inner.empty() || inner.find_first_of("{} ") != std::string::npos) continue;
        try {
            (void)name_template("{" + inner + "}");
        } catch (const template_error&) {
            continue;  // not a field name: a literal brace text it is
        }
        s.fail(key, "writes {{" + inner + "}}, which is the literal text {" + inner +
                        "}; a field takes single braces: {" + inner + "}");
    }
    return t;
}

// ---------------------------------------------------------------------------------------------

class url_template {
public:
    url_template() = default;
    url_template(settings& s, const std::string& key, const std::string& text) : t_(parse_template(s, key, text)) {}

    bool constant() const noexcept { return t_.constant(); }
    const std::string& text() const noexcept { return t_.text(); }

    std::string render(const event_fields& f) const {
        if (t_.single_field()) return t_.expand(f, &header_escape);  // a whole URL; control characters dropped
        return t_.expand(f, &percent_encode);
    }

private:
    name_template t_;
};

// Form fields in the order given.
class form_template {
public:
    void add(settings& s, const std::string& key, const std::string& name, const std::string& value) {
        if (name.empty()) s.fail(key, "has an empty field name");
        for (auto& [n, t] : fields_)
            if (n == name) {
                t = parse_template(s, key + "." + name, value);
                return;
            }
        fields_.emplace_back(name, parse_template(s, key + "." + name, value));
    }
    bool empty() const noexcept { return fields_.empty(); }

    std::string render(const event_fields& f) const {
        std::string out;
        for (const auto& [name, t] : fields_) {
            if (!out.empty()) out += '&';
            form_encode(out, name);
            out += '=';
            form_encode(out, t.expand(f));
        }
        return out;
    }

private:
    std::vector<std::pair<std::string, name_template>> fields_;
};

// A JSON document whose string leaves are templates. Object keys are literal; numbers, booleans
// and null are copied as they are.
class json_template {
public:
    json_template() = default;
    json_template(settings& s, const std::string& key, const json& doc) : root_(build(s, key, doc)) {}

    bool empty() const noexcept { return !root_; }

    json render_value(const event_fields& f) const { return root_ ? render(*root_, f) : json(); }
    std::string render(const event_fields& f) const { return dump_json(render_value(f)); }

    // Sets (or replaces) the leaf at path (keys of nested objects, created as needed).
    void set(settings& s, const std::string& key, const std::vector<std::string>& path, const std::string& text) {
        if (!root_) root_ = std::make_unique<node>(node{node::object, {}, {}, {}});
        node* cur = root_.get();
        for (size_t i = 0; i < path.size(); ++i) {
            node* next = nullptr;
            for (auto& [k, child] : cur->members)
                if (k == path[i]) next = child.get();
            if (!next) {
                cur->members.emplace_back(path[i], std::make_unique<node>(node{node::object, {}, {}, {}}));
                next = cur->members.back().second.get();
            }
            cur = next;
        }
        cur->kind = node::string;
        cur->members.clear();
        cur->tpl = parse_template(s, key, text);
    }

private:
    struct node {
        enum kind_t { object, array, string, literal } kind;
        std::vector<std::pair<std::string, std::unique_ptr<node>>> members;  // object members, array items ("")
        name_template tpl;                                                   // string
        json value;                                                          // literal
    };

    static std::unique_ptr<node> build(settings& s, const std::string& key, const json& v) {
        auto n = std::make_unique<node>(node{node::literal, {}, {}, {}});
        if (v.is_object()) {
            n->kind = node::object;
            for (auto it = v.begin(); it != v.end(); ++it)
                n->members.emplace_back(it.key(), build(s, key + "." + it.key(), it.value()));
        } else if (v.is_array()) {
            n->kind = node::array;
            size_t i = 0;
            for (const auto& e : v) n->members.emplace_back("", build(s, key + "." + std::to_string(i++), e));
        } else if (v.is_string()) {
            n->kind = node::string;
            n->tpl = parse_template(s, key, v.get<std::string>());
        } else {
            n->value = v;
        }
        return n;
    }

    static json render(const node& n, const event_fields& f) {
        switch (n.kind) {
        case node::object: {
            json o = json::object();
            for (const auto& [k, child] : n.members) o[k] = render(*child, f);
            return o;
        }
        case node::array: {
            json a = json::array();
            for (const auto& [k, child] : n.members) a.push_back(render(*child, f));
            return a;
        }
        case node::string:
            return n.tpl.expand(f);
        case node::literal:
            break;
        }
        return n.value;
    }

    std::shared_ptr<node> root_;
};

}  // namespace evmesh::channels::http
