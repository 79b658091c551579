// The device's store-and-forward spool: an SQLite database (<data-dir>/spool.db, WAL) holding
// every telemetry message from before it is published until its PUBACK, so nothing is lost across
// reconnects, broker restarts or agent restarts (docs/telemetry.md, "Delivery").
//
// The per-device counters live in the same database and change in the same transactions as the
// messages: `seq` (grows by one per message, never reused) and `bdSeq` (one per MQTT CONNECT).
// The spool's *epoch*, a random 64-bit id chosen when the database is created, is sent with every
// message: a re-imaged device or a recreated spool.db starts seq and bdSeq over under a new epoch,
// which tells the monitor to start its sequence bookkeeping for the device over too.
// The spool has a byte budget (topic + payload bytes of the queued messages); a message that
// would exceed it makes room by dropping the oldest ones, which are counted in `dropped_total`.
// One process at a time: the database is opened in SQLite's exclusive locking mode.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

struct sqlite3;
struct sqlite3_stmt;

namespace edgesmith {

/// Default byte budget of a spool.
constexpr uint64_t SPOOL_DEFAULT_MAX_BYTES = 32ull << 20;

/// One queued message.
struct SpoolMessage {
  int64_t id = 0;        ///< position in the spool: replay order
  std::string topic;
  std::string payload;
  uint64_t bd_seq = 0;   ///< the session it was made in
  uint64_t seq = 0;
};

/// What spool_append() did.
struct SpoolAppendResult {
  int64_t id = 0;        ///< the new message's id (0 when it was itself dropped: larger than the budget)
  uint64_t seq = 0;      ///< its seq
  uint64_t dropped = 0;  ///< messages dropped to make room (the new one included, if it was)
};

/// Counters and size of a spool.
struct SpoolState {
  uint64_t queued = 0;         ///< messages waiting for a PUBACK
  uint64_t queued_bytes = 0;   ///< their topic + payload bytes
  uint64_t dropped_total = 0;  ///< messages dropped over the spool's life
  uint64_t seq = 0;            ///< last seq handed out
  uint64_t bd_seq = 0;         ///< last bdSeq handed out
};

/// An SQLite spool. All methods are safe to call from many threads.
/// Move a corrupt spool database (and its -wal / -shm files) aside to `<path>.corrupt-<unix time>`
/// so a new one can be created; returns the new name. Throws Error(ERROR_CODE_IO) when it cannot.
std::string spool_set_aside(const std::string& path);

class Spool {
 public:
  /// Open (or create) the spool database at `path` with a budget of `max_bytes`. A file that is
  /// not an SQLite database or is corrupt is moved aside (spool_set_aside) and a new spool is
  /// created: its counters start afresh. Throws Error(ERROR_CODE_IO) when the file cannot be
  /// opened or another process holds it.
  Spool(const std::string& path, uint64_t max_bytes = SPOOL_DEFAULT_MAX_BYTES);
  ~Spool();
  Spool(const Spool&) = delete;
  Spool& operator=(const Spool&) = delete;

  /// Start a session: increment and store bdSeq, return it (call before each MQTT CONNECT).
  uint64_t spool_session_begin();

  /// The seq a session's birth will carry, stored before the CONNECT so the will can name it. The
  /// same seq is returned until spool_append() uses it, so failed connection attempts leave no gap.
  uint64_t spool_birth_seq();

  /// Store one message: `make_payload(seq)` builds it with its seq; `use_seq` 0 takes the next
  /// seq, else that seq (the reserved birth seq). Drops the oldest messages when over budget.
  SpoolAppendResult spool_append(const std::string& topic, uint64_t bd_seq,
                                 const std::function<std::string(uint64_t seq)>& make_payload,
                                 uint64_t use_seq = 0);

  /// Up to `limit` messages with id > `after_id`, oldest first.
  std::vector<SpoolMessage> spool_read(int64_t after_id, size_t limit);

  /// Delete acknowledged messages (ids that are already gone are ignored), in one transaction.
  void spool_remove(const std::vector<int64_t>& ids);

  /// Counters and size.
  SpoolState spool_state();

  /// The spool's epoch: 16 lower-case hex digits, chosen at random when the database was created.
  const std::string& spool_epoch() const noexcept { return epoch_; }

  /// Drops not yet reported in a spool_dropped event: dropped_total minus what was marked reported.
  uint64_t spool_dropped_unreported();

  /// Mark `count` more drops as reported.
  void spool_dropped_mark_reported(uint64_t count);

 private:
  void db_open();
  void db_close();
  uint64_t counter_get(const char* name);
  void counter_set(const char* name, uint64_t value);
  void exec(const char* sql);
  sqlite3_stmt* prepare(const char* sql);

  std::mutex mutex_;
  std::string path_;
  uint64_t max_bytes_;
  sqlite3* db_ = nullptr;
  uint64_t queued_ = 0;
  uint64_t queued_bytes_ = 0;
  std::string epoch_;
  std::vector<sqlite3_stmt*> statements_;
  sqlite3_stmt* insert_ = nullptr;
  sqlite3_stmt* select_after_ = nullptr;
  sqlite3_stmt* select_oldest_ = nullptr;
  sqlite3_stmt* delete_id_ = nullptr;
  sqlite3_stmt* counter_get_ = nullptr;
  sqlite3_stmt* counter_set_ = nullptr;
};

}  // namespace edgesmith
