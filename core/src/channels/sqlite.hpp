// A thin RAII layer over the SQLite C API for the channel outbox: one connection, prepared
// statements with typed binds. Errors throw `sqlite_error` (caught at the runtime's boundary).
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace evmesh::channels::detail {

struct sqlite_error : std::runtime_error {
    explicit sqlite_error(const std::string& what, int rc = SQLITE_ERROR) : std::runtime_error(what), code(rc) {}

    // A condition that goes away by itself (disk full, another connection holding the lock,
    // an I/O error of the moment): retried with backoff. Anything else (corruption, a schema
    // from the future, misuse) stops the outbox.
    bool transient() const {
        switch (code & 0xff) {
            case SQLITE_FULL:
            case SQLITE_IOERR:
            case SQLITE_BUSY:
            case SQLITE_LOCKED:
            case SQLITE_NOMEM:
            case SQLITE_CANTOPEN:
            case SQLITE_PROTOCOL:
                return true;
            default:
                return false;
        }
    }

    int code;  ///< extended result code
};

class database {
public:
    database() = default;
    database(const database&) = delete;
    database& operator=(const database&) = delete;
    ~database() { close(); }

    void open(const std::string& path) {
        if (const int rc = sqlite3_open_v2(path.c_str(), &db_,
                                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                                           nullptr);
            rc != SQLITE_OK) {
            std::string msg = db_ != nullptr ? sqlite3_errmsg(db_) : "out of memory";
            close();
            throw sqlite_error("cannot open outbox " + path + ": " + msg, rc);
        }
        sqlite3_extended_result_codes(db_, 1);
        sqlite3_busy_timeout(db_, 2000);  // then the store retries with backoff (healthz 503)
    }

    void close() {
        if (db_ != nullptr) {
            sqlite3_close_v2(db_);
            db_ = nullptr;
        }
    }

    void exec(const char* sql) {
        char* err = nullptr;
        if (const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &err); rc != SQLITE_OK) {
            std::string msg = err != nullptr ? err : "unknown error";
            sqlite3_free(err);
            throw sqlite_error(std::string("sqlite: ") + msg + " in: " + sql, rc);
        }
    }

    sqlite3* get() const { return db_; }
    std::int64_t last_rowid() const { return sqlite3_last_insert_rowid(db_); }
    int changes() const { return sqlite3_changes(db_); }

private:
    sqlite3* db_ = nullptr;
};

class statement {
public:
    statement() = default;
    statement(database& db, const char* sql) : db_(db.get()) {
        if (const int rc = sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &s_, nullptr); rc != SQLITE_OK) {
            throw sqlite_error(std::string("sqlite prepare: ") + sqlite3_errmsg(db_) + " in: " + sql, rc);
        }
    }
    statement(const statement&) = delete;
    statement& operator=(const statement&) = delete;
    statement(statement&& o) noexcept : db_(o.db_), s_(o.s_) { o.s_ = nullptr; }
    statement& operator=(statement&& o) noexcept {
        std::swap(db_, o.db_);
        std::swap(s_, o.s_);
        return *this;
    }
    ~statement() { sqlite3_finalize(s_); }

    statement& bind(int i, std::int64_t v) {
        check(sqlite3_bind_int64(s_, i, v));
        return *this;
    }
    statement& bind(int i, std::string_view text) {
        check(sqlite3_bind_text64(s_, i, text.data(), text.size(), SQLITE_TRANSIENT, SQLITE_UTF8));
        return *this;
    }
    statement& bind_double(int i, double v) {
        check(sqlite3_bind_double(s_, i, v));
        return *this;
    }
    statement& bind_blob(int i, const void* p, std::size_t n) {
        check(sqlite3_bind_blob64(s_, i, n == 0 ? "" : p, n, SQLITE_TRANSIENT));
        return *this;
    }

    // Steps once: true when a row is available.
    bool step() {
        const int rc = sqlite3_step(s_);
        if (rc == SQLITE_ROW) {
            return true;
        }
        if (rc == SQLITE_DONE) {
            return false;
        }
        const std::string msg = std::string("sqlite step: ") + sqlite3_errmsg(db_);
        sqlite3_reset(s_);  // the statement stays usable for the retry
        throw sqlite_error(msg, rc);
    }

    // Runs a statement that returns no rows, then resets it.
    void run() {
        step();
        reset();
    }

    void reset() {
        sqlite3_reset(s_);
        sqlite3_clear_bindings(s_);
    }

    std::int64_t i64(int col) const { return sqlite3_column_int64(s_, col); }
    double f64(int col) const { return sqlite3_column_double(s_, col); }
    std::string_view text(int col) const {
        const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_, col));
        return p == nullptr ? std::string_view() : std::string_view(p, static_cast<std::size_t>(sqlite3_column_bytes(s_, col)));
    }
    std::string_view blob(int col) const {
        const auto* p = static_cast<const char*>(sqlite3_column_blob(s_, col));
        return p == nullptr ? std::string_view() : std::string_view(p, static_cast<std::size_t>(sqlite3_column_bytes(s_, col)));
    }

private:
    void check(int rc) {
        if (rc != SQLITE_OK) {
            throw sqlite_error(std::string("sqlite bind: ") + sqlite3_errmsg(db_), rc);
        }
    }
    sqlite3* db_ = nullptr;
    sqlite3_stmt* s_ = nullptr;
};

// BEGIN IMMEDIATE ... COMMIT, rolled back when an exception leaves the scope.
class transaction {
public:
    explicit transaction(database& db) : db_(db) { db_.exec("BEGIN IMMEDIATE"); }
    transaction(const transaction&) = delete;
    transaction& operator=(const transaction&) = delete;
    void commit() {
        db_.exec("COMMIT");
        done_ = true;
    }
    ~transaction() {
        if (!done_) {
            sqlite3_exec(db_.get(), "ROLLBACK", nullptr, nullptr, nullptr);
        }
    }

private:
    database& db_;
    bool done_ = false;
};

}  // namespace evmesh::channels::detail
