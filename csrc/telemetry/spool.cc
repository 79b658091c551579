#include "telemetry/spool.h"

#include <sqlite3.h>

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <random>
#include <system_error>
#include <utility>

#include "common/error.h"

namespace edgesmith {

namespace {

const char* const COUNTER_SEQ = "seq";
const char* const COUNTER_BD_SEQ = "bdSeq";
const char* const COUNTER_BIRTH_SEQ = "birth_seq";  // reserved for the next birth; 0: none
const char* const COUNTER_DROPPED = "dropped_total";
const char* const COUNTER_DROPPED_REPORTED = "dropped_reported";
const char* const COUNTER_EPOCH = "epoch";  // random, nonzero; chosen once, when the database is created

// 64 random bits from the OS (std::random_device reads the kernel's generator here), never 0.
uint64_t random_epoch() {
  std::random_device device;
  uint64_t value = 0;
  while (value == 0) value = (static_cast<uint64_t>(device()) << 32) ^ static_cast<uint64_t>(device());
  return value;
}

// Resets a prepared statement when it goes out of scope, so it can be reused.
class StatementUse {
 public:
  explicit StatementUse(sqlite3_stmt* statement) : statement_(statement) {}
  ~StatementUse() {
    sqlite3_reset(statement_);
    sqlite3_clear_bindings(statement_);
  }
  StatementUse(const StatementUse&) = delete;
  StatementUse& operator=(const StatementUse&) = delete;

 private:
  sqlite3_stmt* statement_;
};

// SQLite integers are signed 64-bit; the counters are stored bit for bit.
int64_t to_sql(uint64_t value) { return static_cast<int64_t>(value); }
uint64_t from_sql(int64_t value) { return static_cast<uint64_t>(value); }

}  // namespace

namespace {

// Thrown by db_open() when SQLite says the file is not a database or is damaged.
struct SpoolCorrupt {
  std::string why;
};

}  // namespace

std::string spool_set_aside(const std::string& path) {
  const std::string aside = path + ".corrupt-" + std::to_string(static_cast<long long>(std::time(nullptr)));
  std::error_code ec;
  std::filesystem::rename(path, aside, ec);
  if (ec) throw Error(ERROR_CODE_IO, "cannot move the corrupt spool " + path + " aside (" + ec.message() + ")");
  for (const char* suffix : {"-wal", "-shm"}) {
    std::filesystem::rename(path + suffix, aside + suffix, ec);  // absent is fine
  }
  return aside;
}

Spool::Spool(const std::string& path, uint64_t max_bytes) : path_(path), max_bytes_(max_bytes) {
  try {
    db_open();
  } catch (const SpoolCorrupt& corrupt) {
    // A spool that cannot be read must not stop the device for good: keep it for inspection and
    // start a new one (its seq restarts; the monitor sees a new spool, not duplicates).
    const std::string aside = spool_set_aside(path_);
    std::cerr << "edgesmith: the spool " << path_ << " is corrupt (" << corrupt.why << "); it is kept as " << aside
              << " and a new spool is created" << std::endl;
    try {
      db_open();
    } catch (const SpoolCorrupt& again) {
      throw Error(ERROR_CODE_IO, "the spool " + path_ + " cannot be created (" + again.why + ")");
    }
  }
}

void Spool::db_close() {
  for (sqlite3_stmt* statement : statements_) sqlite3_finalize(statement);
  statements_.clear();
  sqlite3_close(db_);
  db_ = nullptr;
}

void Spool::db_open() {
  const std::string& path = path_;
  const int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
  if (sqlite3_open_v2(path.c_str(), &db_, flags, nullptr) != SQLITE_OK) {
    const std::string why = db_ != nullptr ? sqlite3_errmsg(db_) : "out of memory";
    const int code = db_ != nullptr ? sqlite3_errcode(db_) : SQLITE_NOMEM;
    sqlite3_close(db_);
    db_ = nullptr;
    if (code == SQLITE_CORRUPT || code == SQLITE_NOTADB) throw SpoolCorrupt{why};
    throw Error(ERROR_CODE_IO, "cannot open the spool " + path + " (" + why + "); check the data directory");
  }
  try {
    sqlite3_busy_timeout(db_, 2000);
    // Exclusive: a second agent on the same data directory fails here instead of interleaving seqs.
    exec("PRAGMA locking_mode=EXCLUSIVE");
    exec("PRAGMA journal_mode=WAL");
    // FULL: a committed message survives a power cut, not only a crash of the process.
    exec("PRAGMA synchronous=FULL");
    exec("CREATE TABLE IF NOT EXISTS messages ("
         "id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL, "
         "bd_seq INTEGER NOT NULL, seq INTEGER NOT NULL, bytes INTEGER NOT NULL)");
    exec("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)");
    insert_ = prepare("INSERT INTO messages (topic, payload, bd_seq, seq, bytes) VALUES (?, ?, ?, ?, ?)");
    select_after_ = prepare("SELECT id, topic, payload, bd_seq, seq FROM messages WHERE id > ? ORDER BY id LIMIT ?");
    select_oldest_ = prepare("SELECT id, bytes FROM messages ORDER BY id LIMIT 256");
    delete_id_ = prepare("DELETE FROM messages WHERE id = ? RETURNING bytes");
    counter_get_ = prepare("SELECT value FROM counters WHERE name = ?");
    counter_set_ = prepare("INSERT INTO counters (name, value) VALUES (?, ?) "
                           "ON CONFLICT(name) DO UPDATE SET value = excluded.value");
    sqlite3_stmt* totals = prepare("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM messages");
    {
      StatementUse use(totals);
      if (sqlite3_step(totals) != SQLITE_ROW) {
        throw Error(ERROR_CODE_IO, "cannot read the spool " + path + " (" + sqlite3_errmsg(db_) + ")");
      }
      queued_ = from_sql(sqlite3_column_int64(totals, 0));
      queued_bytes_ = from_sql(sqlite3_column_int64(totals, 1));
    }
    uint64_t epoch = counter_get(COUNTER_EPOCH);
    if (epoch == 0) {  // a new spool (or one from before epochs): a new epoch, stored before any message
      epoch = random_epoch();
      counter_set(COUNTER_EPOCH, epoch);
    }
    char hex[17];
    std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(epoch));
    epoch_ = hex;
  } catch (const Error& e) {
    const int code = sqlite3_errcode(db_);
    db_close();
    if (code == SQLITE_CORRUPT || code == SQLITE_NOTADB) throw SpoolCorrupt{e.what()};
    throw;
  } catch (...) {
    db_close();
    throw;
  }
}

Spool::~Spool() { db_close(); }

void Spool::exec(const char* sql) {
  char* message = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &message) != SQLITE_OK) {
    std::string why = message != nullptr ? message : sqlite3_errmsg(db_);
    sqlite3_free(message);
    if (sqlite3_errcode(db_) == SQLITE_BUSY) {
      why = "another process has it open; is a second agent using the same data directory?";
    }
    throw Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + why + ")");
  }
}

sqlite3_stmt* Spool::prepare(const char* sql) {
  sqlite3_stmt* statement = nullptr;
  if (sqlite3_prepare_v2(db_, sql, -1, &statement, nullptr) != SQLITE_OK) {
    throw Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + sqlite3_errmsg(db_) + ")");
  }
  statements_.push_back(statement);
  return statement;
}

uint64_t Spool::counter_get(const char* name) {
  StatementUse use(counter_get_);
  sqlite3_bind_text(counter_get_, 1, name, -1, SQLITE_STATIC);
  const int rc = sqlite3_step(counter_get_);
  if (rc == SQLITE_ROW) return from_sql(sqlite3_column_int64(counter_get_, 0));
  if (rc != SQLITE_DONE) throw Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + sqlite3_errmsg(db_) + ")");
  return 0;
}

void Spool::counter_set(const char* name, uint64_t value) {
  StatementUse use(counter_set_);
  sqlite3_bind_text(counter_set_, 1, name, -1, SQLITE_STATIC);
  sqlite3_bind_int64(counter_set_, 2, to_sql(value));
  if (sqlite3_step(counter_set_) != SQLITE_DONE) {
    throw Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + sqlite3_errmsg(db_) + ")");
  }
}

namespace {

// BEGIN IMMEDIATE ... COMMIT, rolled back when the scope is left by an exception.
class Transaction {
 public:
  explicit Transaction(sqlite3* db) : db_(db) { sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr); }
  ~Transaction() {
    if (!done_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  bool commit() {
    done_ = true;
    return sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK;
  }

 private:
  sqlite3* db_;
  bool done_ = false;
};

}  // namespace

uint64_t Spool::spool_session_begin() {
  std::lock_guard<std::mutex> lock(mutex_);
  Transaction txn(db_);
  const uint64_t bd_seq = counter_get(COUNTER_BD_SEQ) + 1;
  counter_set(COUNTER_BD_SEQ, bd_seq);
  if (!txn.commit()) throw Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + sqlite3_errmsg(db_) + ")");
  return bd_seq;
}

uint64_t Spool::spool_birth_seq() {
  std::lock_guard<std::mutex> lock(mutex_);
  Transaction txn(db_);
  uint64_t seq = counter_get(COUNTER_BIRTH_SEQ);
  if (seq == 0) {
    seq = counter_get(COUNTER_SEQ) + 1;
    counter_set(COUNTER_SEQ, seq);
    counter_set(COUNTER_BIRTH_SEQ, seq);
  }
  if (!txn.commit()) throw Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + sqlite3_errmsg(db_) + ")");
  return seq;
}

SpoolAppendResult Spool::spool_append(const std::string& topic, uint64_t bd_seq,
                                      const std::function<std::string(uint64_t)>& make_payload,
                                      uint64_t use_seq) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto fail = [&]() -> Error {
    return Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + sqlite3_errmsg(db_) + ")");
  };
  Transaction txn(db_);
  SpoolAppendResult result;
  if (use_seq == 0) {
    result.seq = counter_get(COUNTER_SEQ) + 1;
    counter_set(COUNTER_SEQ, result.seq);
  } else {
    result.seq = use_seq;
    if (counter_get(COUNTER_BIRTH_SEQ) == use_seq) counter_set(COUNTER_BIRTH_SEQ, 0);
  }
  const std::string payload = make_payload(result.seq);
  const uint64_t bytes = topic.size() + payload.size();
  {
    StatementUse use(insert_);
    sqlite3_bind_text(insert_, 1, topic.data(), static_cast<int>(topic.size()), SQLITE_STATIC);
    sqlite3_bind_blob(insert_, 2, payload.data(), static_cast<int>(payload.size()), SQLITE_STATIC);
    sqlite3_bind_int64(insert_, 3, to_sql(bd_seq));
    sqlite3_bind_int64(insert_, 4, to_sql(result.seq));
    sqlite3_bind_int64(insert_, 5, to_sql(bytes));
    if (sqlite3_step(insert_) != SQLITE_DONE) throw fail();
  }
  result.id = sqlite3_last_insert_rowid(db_);
  uint64_t queued = queued_ + 1;
  uint64_t queued_bytes = queued_bytes_ + bytes;
  // Over budget: drop the oldest (possibly the new message itself, if it alone is too large).
  while (queued_bytes > max_bytes_ && queued > 0) {
    std::vector<std::pair<int64_t, uint64_t>> oldest;
    {
      StatementUse use(select_oldest_);
      int rc;
      while ((rc = sqlite3_step(select_oldest_)) == SQLITE_ROW) {
        oldest.emplace_back(sqlite3_column_int64(select_oldest_, 0),
                            from_sql(sqlite3_column_int64(select_oldest_, 1)));
      }
      if (rc != SQLITE_DONE) throw fail();
    }
    for (const auto& [id, size] : oldest) {
      if (queued_bytes <= max_bytes_) break;
      StatementUse use(delete_id_);
      sqlite3_bind_int64(delete_id_, 1, id);
      if (sqlite3_step(delete_id_) != SQLITE_ROW) throw fail();
      queued -= 1;
      queued_bytes -= size;
      result.dropped += 1;
      if (id == result.id) result.id = 0;
    }
  }
  if (result.dropped > 0) counter_set(COUNTER_DROPPED, counter_get(COUNTER_DROPPED) + result.dropped);
  if (!txn.commit()) throw fail();
  queued_ = queued;
  queued_bytes_ = queued_bytes;
  return result;
}

std::vector<SpoolMessage> Spool::spool_read(int64_t after_id, size_t limit) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<SpoolMessage> out;
  StatementUse use(select_after_);
  sqlite3_bind_int64(select_after_, 1, after_id);
  sqlite3_bind_int64(select_after_, 2, static_cast<int64_t>(limit));
  int rc;
  while ((rc = sqlite3_step(select_after_)) == SQLITE_ROW) {
    SpoolMessage m;
    m.id = sqlite3_column_int64(select_after_, 0);
    m.topic = reinterpret_cast<const char*>(sqlite3_column_text(select_after_, 1));
    const auto* blob = static_cast<const char*>(sqlite3_column_blob(select_after_, 2));
    m.payload.assign(blob != nullptr ? blob : "", static_cast<size_t>(sqlite3_column_bytes(select_after_, 2)));
    m.bd_seq = from_sql(sqlite3_column_int64(select_after_, 3));
    m.seq = from_sql(sqlite3_column_int64(select_after_, 4));
    out.push_back(std::move(m));
  }
  if (rc != SQLITE_DONE) {
    throw Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + sqlite3_errmsg(db_) + ")");
  }
  return out;
}

void Spool::spool_remove(const std::vector<int64_t>& ids) {
  if (ids.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Transaction txn(db_);
  uint64_t removed = 0;
  uint64_t removed_bytes = 0;
  for (const int64_t id : ids) {
    StatementUse use(delete_id_);
    sqlite3_bind_int64(delete_id_, 1, id);
    const int rc = sqlite3_step(delete_id_);
    if (rc == SQLITE_ROW) {
      removed += 1;
      removed_bytes += from_sql(sqlite3_column_int64(delete_id_, 0));
      sqlite3_step(delete_id_);  // finish the statement (RETURNING yields before it completes)
    } else if (rc != SQLITE_DONE) {
      throw Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + sqlite3_errmsg(db_) + ")");
    }
  }
  if (!txn.commit()) throw Error(ERROR_CODE_IO, "the spool " + path_ + " failed (" + sqlite3_errmsg(db_) + ")");
  queued_ -= removed;
  queued_bytes_ -= removed_bytes;
}

SpoolState Spool::spool_state() {
  std::lock_guard<std::mutex> lock(mutex_);
  SpoolState state;
  state.queued = queued_;
  state.queued_bytes = queued_bytes_;
  state.dropped_total = counter_get(COUNTER_DROPPED);
  state.seq = counter_get(COUNTER_SEQ);
  state.bd_seq = counter_get(COUNTER_BD_SEQ);
  return state;
}

uint64_t Spool::spool_dropped_unreported() {
  std::lock_guard<std::mutex> lock(mutex_);
  return counter_get(COUNTER_DROPPED) - counter_get(COUNTER_DROPPED_REPORTED);
}

void Spool::spool_dropped_mark_reported(uint64_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  counter_set(COUNTER_DROPPED_REPORTED, counter_get(COUNTER_DROPPED_REPORTED) + count);
}

}  // namespace edgesmith
