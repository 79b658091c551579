// The telemetry spool (csrc/telemetry/spool.h): order, seq and bdSeq across reopen, the byte
// budget, removal on acknowledgement, one process per database.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "common/error.h"
#include "telemetry/spool.h"

namespace edgesmith {
namespace {

class SpoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("edgesmith-spool-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path() const { return (dir_ / "spool.db").string(); }

  std::filesystem::path dir_;
};

std::string payload_of(uint64_t seq) { return "{\"seq\":" + std::to_string(seq) + "}"; }

TEST_F(SpoolTest, EpochIsRandomKeptAcrossReopenAndNewWithANewDatabase) {
  std::string first;
  {
    Spool spool(path());
    first = spool.spool_epoch();
    ASSERT_EQ(first.size(), 16u);
    EXPECT_EQ(first.find_first_not_of("0123456789abcdef"), std::string::npos);
  }
  {
    Spool spool(path());
    EXPECT_EQ(spool.spool_epoch(), first);  // reopened: the same spool, the same epoch
  }
  std::filesystem::remove_all(dir_);  // a re-image: the spool is created anew
  std::filesystem::create_directories(dir_);
  Spool spool(path());
  EXPECT_NE(spool.spool_epoch(), first);
  EXPECT_EQ(spool.spool_session_begin(), 1u);  // and bdSeq starts over with it
}

TEST_F(SpoolTest, AppendsInOrderWithGrowingSeq) {
  Spool spool(path());
  for (int i = 0; i < 5; ++i) {
    const SpoolAppendResult r = spool.spool_append("t", 1, payload_of);
    EXPECT_EQ(r.seq, static_cast<uint64_t>(i + 1));
    EXPECT_EQ(r.dropped, 0u);
  }
  const std::vector<SpoolMessage> all = spool.spool_read(0, 100);
  ASSERT_EQ(all.size(), 5u);
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(all[i].seq, i + 1);
    EXPECT_EQ(all[i].payload, payload_of(i + 1));
    EXPECT_EQ(all[i].topic, "t");
    EXPECT_EQ(all[i].bd_seq, 1u);
    if (i > 0) {
      EXPECT_GT(all[i].id, all[i - 1].id);
    }
  }
  const std::vector<SpoolMessage> after = spool.spool_read(all[2].id, 100);
  ASSERT_EQ(after.size(), 2u);
  EXPECT_EQ(after[0].seq, 4u);
  EXPECT_EQ(spool.spool_read(all[0].id, 1).size(), 1u);
}

TEST_F(SpoolTest, CountersAndMessagesSurviveReopen) {
  int64_t second_id = 0;
  {
    Spool spool(path());
    EXPECT_EQ(spool.spool_session_begin(), 1u);
    EXPECT_EQ(spool.spool_session_begin(), 2u);
    spool.spool_append("t", 2, payload_of);
    second_id = spool.spool_append("t", 2, payload_of).id;
    spool.spool_append("t", 2, payload_of);
    spool.spool_remove({second_id});
  }
  Spool spool(path());
  const SpoolState state = spool.spool_state();
  EXPECT_EQ(state.bd_seq, 2u);
  EXPECT_EQ(state.seq, 3u);
  EXPECT_EQ(state.queued, 2u);
  EXPECT_EQ(spool.spool_session_begin(), 3u);
  const SpoolAppendResult next = spool.spool_append("t", 3, payload_of);
  EXPECT_EQ(next.seq, 4u);
  EXPECT_GT(next.id, second_id);  // ids are never reused, so replay order is creation order
  const std::vector<SpoolMessage> left = spool.spool_read(0, 10);
  ASSERT_EQ(left.size(), 3u);
  EXPECT_EQ(left[0].seq, 1u);
  EXPECT_EQ(left[1].seq, 3u);
  EXPECT_EQ(left[2].seq, 4u);
  EXPECT_EQ(left[2].bd_seq, 3u);
}

TEST_F(SpoolTest, RemoveIgnoresUnknownIdsAndKeepsSizes) {
  Spool spool(path());
  const SpoolAppendResult a = spool.spool_append("topic", 1, payload_of);
  const SpoolAppendResult b = spool.spool_append("topic", 1, payload_of);
  const uint64_t one = std::string("topic").size() + payload_of(1).size();
  EXPECT_EQ(spool.spool_state().queued_bytes, 2 * one);
  spool.spool_remove({a.id, a.id, 12345});
  SpoolState state = spool.spool_state();
  EXPECT_EQ(state.queued, 1u);
  EXPECT_EQ(state.queued_bytes, one);
  spool.spool_remove({b.id});
  state = spool.spool_state();
  EXPECT_EQ(state.queued, 0u);
  EXPECT_EQ(state.queued_bytes, 0u);
  EXPECT_TRUE(spool.spool_read(0, 10).empty());
}

TEST_F(SpoolTest, BudgetDropsOldestAndCountsThem) {
  const std::string big(100, 'x');
  const uint64_t per_message = 1 + big.size();  // topic "t" + payload
  Spool spool(path(), 3 * per_message);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(spool.spool_append("t", 1, [&](uint64_t) { return big; }).dropped, 0u);
  const SpoolAppendResult r = spool.spool_append("t", 1, [&](uint64_t) { return big; });
  EXPECT_EQ(r.dropped, 1u);
  EXPECT_NE(r.id, 0);
  for (int i = 0; i < 5; ++i) spool.spool_append("t", 1, [&](uint64_t) { return big; });
  const SpoolState state = spool.spool_state();
  EXPECT_EQ(state.queued, 3u);
  EXPECT_LE(state.queued_bytes, 3 * per_message);
  EXPECT_EQ(state.dropped_total, 6u);
  EXPECT_EQ(state.seq, 9u);
  const std::vector<SpoolMessage> left = spool.spool_read(0, 10);
  ASSERT_EQ(left.size(), 3u);
  EXPECT_EQ(left[0].seq, 7u);  // the newest three survive
  EXPECT_EQ(left[2].seq, 9u);
  // What was dropped is reported once.
  EXPECT_EQ(spool.spool_dropped_unreported(), 6u);
  spool.spool_dropped_mark_reported(6);
  EXPECT_EQ(spool.spool_dropped_unreported(), 0u);
  spool.spool_append("t", 1, [&](uint64_t) { return big; });
  EXPECT_EQ(spool.spool_dropped_unreported(), 1u);
}

TEST_F(SpoolTest, MessageLargerThanBudgetIsDroppedItself) {
  Spool spool(path(), 50);
  spool.spool_append("t", 1, [](uint64_t) { return std::string(10, 'a'); });
  const SpoolAppendResult r = spool.spool_append("t", 1, [](uint64_t) { return std::string(500, 'b'); });
  EXPECT_EQ(r.id, 0);
  EXPECT_EQ(r.dropped, 2u);
  EXPECT_EQ(spool.spool_state().queued, 0u);
  EXPECT_EQ(spool.spool_state().dropped_total, 2u);
}

TEST_F(SpoolTest, BirthSeqIsReservedUntilUsed) {
  Spool spool(path());
  const uint64_t birth = spool.spool_birth_seq();
  EXPECT_EQ(birth, 1u);
  // A failed CONNECT attempt asks again: same seq, no gap.
  EXPECT_EQ(spool.spool_birth_seq(), birth);
  EXPECT_EQ(spool.spool_append("t", 1, payload_of).seq, 2u);
  EXPECT_EQ(spool.spool_append("t", 1, payload_of, birth).seq, birth);
  EXPECT_EQ(spool.spool_birth_seq(), 3u);  // the next session's birth
  EXPECT_EQ(spool.spool_append("t", 1, payload_of).seq, 4u);
}

TEST_F(SpoolTest, SecondOpenOfTheSameDatabaseFails) {
  Spool first(path());
  first.spool_append("t", 1, payload_of);
  try {
    Spool second(path());
    second.spool_append("t", 1, payload_of);
    FAIL() << "a second spool on the same database was allowed";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_IO);
    EXPECT_NE(std::string(e.what()).find("spool"), std::string::npos) << e.what();
  }
  // Held by another process is not corrupt: nothing is moved aside.
  for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
    EXPECT_EQ(entry.path().filename().string().find(".corrupt-"), std::string::npos) << entry.path();
  }
}

TEST_F(SpoolTest, ACorruptDatabaseIsSetAsideAndANewOneCreated) {
  const std::string garbage(8192, 'x');
  {
    std::ofstream out(path(), std::ios::binary);
    out << garbage;
  }
  Spool spool(path());  // must not throw: a damaged spool must not keep the agent from starting
  EXPECT_EQ(spool.spool_append("t", 1, payload_of).seq, 1u);
  std::vector<std::filesystem::path> aside;
  for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
    if (entry.path().filename().string().rfind("spool.db.corrupt-", 0) == 0) aside.push_back(entry.path());
  }
  ASSERT_EQ(aside.size(), 1u);
  std::ifstream in(aside[0], std::ios::binary);
  EXPECT_EQ(std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()), garbage);
}

TEST_F(SpoolTest, UnwritableLocationIsAnIoError) {
  try {
    Spool spool((dir_ / "missing" / "dir" / "spool.db").string());
    FAIL() << "opened a spool in a missing directory";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_IO);
  }
}

}  // namespace
}  // namespace edgesmith
