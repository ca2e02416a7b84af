// A Kafka "broker" for the bridge tests and benchmark: Debian packages no Kafka server, so this
// runs librdkafka's built-in mock cluster (rdkafka_mock.h: an in-process cluster speaking the
// real Kafka protocol on loopback ports; it keeps records in memory only), plus a plain librdkafka
// consumer and producer as the independent client side.
//
//   evmesh_kafka_mock serve [--topic NAME]... [--partitions N] [--control 1]
//       prints "BOOTSTRAP host:port[,...]" and serves until SIGTERM/SIGINT; with --control, the
//       lines "down" / "up" on stdin take the (one) broker down (connections closed, new ones
//       refused) and up again, each answered by a line "OK down" / "OK up"
//   evmesh_kafka_mock consume --bootstrap B --topic T --count N [--timeout-ms MS]
//       every record of T from the beginning of each partition, one JSON object a line
//       {"partition","offset","key","value","headers":{name: value}}, until N or the timeout
//   evmesh_kafka_mock produce --bootstrap B --topic T --count N [--size BYTES]
//       an idempotent producer (as the bridge's) sending N records; prints {"count","seconds","rate"}
//   evmesh_kafka_mock produce-lines --bootstrap B --topic T
//       one record per JSON line on stdin {"value", "key"?, "headers"?: {name: value}, "partition"?}
//       (value/key/header values: strings), idempotent producer; prints {"partition","offset"} per
//       record in input order once all are written
//   evmesh_kafka_mock committed --bootstrap B --topic T --group G
//       the group's committed offset and the end offset (high watermark) of each partition:
//       {"committed": {"0": offset|-1001, ...}, "end": {"0": offset, ...}}
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <nlohmann/json.hpp>

#include <signal.h>

#include <chrono>
#include <iostream>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace {

using json = nlohmann::json;

struct args {
    std::string mode, bootstrap, topic, group;
    std::vector<std::string> topics;
    int partitions = 3;
    bool control = false;
    long count = 0;
    long timeout_ms = 30000;
    long size = 100;
};

[[noreturn]] void die(const std::string& msg) {
    std::fprintf(stderr, "evmesh_kafka_mock: %s\n", msg.c_str());
    std::exit(2);
}

args parse(int argc, char** argv) {
    if (argc < 2) die("usage: evmesh_kafka_mock serve|consume|produce|produce-lines|committed [options]");
    args a;
    a.mode = argv[1];
    for (int i = 2; i < argc; ++i) {
        std::string k = argv[i];
        if (i + 1 >= argc) die("missing value for " + k);
        std::string v = argv[++i];
        if (k == "--bootstrap") a.bootstrap = v;
        else if (k == "--topic") { a.topic = v; a.topics.push_back(v); }
        else if (k == "--partitions") a.partitions = std::atoi(v.c_str());
        else if (k == "--count") a.count = std::atol(v.c_str());
        else if (k == "--timeout-ms") a.timeout_ms = std::atol(v.c_str());
        else if (k == "--size") a.size = std::atol(v.c_str());
        else if (k == "--group") a.group = v;
        else if (k == "--control") a.control = v == "1";
        else die("unknown option " + k);
    }
    return a;
}

void set(rd_kafka_conf_t* conf, const char* k, const std::string& v) {
    char err[256];
    if (rd_kafka_conf_set(conf, k, v.c_str(), err, sizeof err) != RD_KAFKA_CONF_OK) die(std::string(k) + ": " + err);
}

rd_kafka_t* make(rd_kafka_type_t type, rd_kafka_conf_t* conf) {
    char err[512];
    rd_kafka_t* rk = rd_kafka_new(type, conf, err, sizeof err);
    if (!rk) die(std::string("rd_kafka_new: ") + err);
    return rk;
}

int serve(const args& a) {
    // block the stop signals before librdkafka starts its threads, then wait for them here
    sigset_t set_;
    sigemptyset(&set_);
    sigaddset(&set_, SIGTERM);
    sigaddset(&set_, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    set(conf, "log_level", "3");
    rd_kafka_t* rk = make(RD_KAFKA_PRODUCER, conf);
    rd_kafka_mock_cluster_t* mc = rd_kafka_mock_cluster_new(rk, 1);
    if (!mc) die("rd_kafka_mock_cluster_new failed");
    for (const auto& t : a.topics)
        if (rd_kafka_mock_topic_create(mc, t.c_str(), a.partitions, 1) != RD_KAFKA_RESP_ERR_NO_ERROR)
            die("cannot create topic " + t);
    std::printf("BOOTSTRAP %s\n", rd_kafka_mock_cluster_bootstraps(mc));
    std::fflush(stdout);
    if (a.control) {
        // the mock cluster runs on librdkafka's threads; this one only reads commands
        std::thread([mc] {
            for (std::string line; std::getline(std::cin, line);) {
                if (line == "down") rd_kafka_mock_broker_set_down(mc, 1);
                else if (line == "up") rd_kafka_mock_broker_set_up(mc, 1);
                else continue;
                std::printf("OK %s\n", line.c_str());
                std::fflush(stdout);
            }
        }).detach();
    }
    int sig = 0;
    sigwait(&set_, &sig);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(rk);
    return 0;
}

int consume(const args& a) {
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", a.bootstrap);
    set(conf, "group.id", "evmesh-kafka-mock-reader");  // needed by consumer_poll; offsets are assigned
    set(conf, "enable.auto.commit", "false");
    set(conf, "log_level", "3");
    rd_kafka_t* rk = make(RD_KAFKA_CONSUMER, conf);
    rd_kafka_poll_set_consumer(rk);
    // the topic's partitions, from the metadata
    rd_kafka_topic_t* rkt = rd_kafka_topic_new(rk, a.topic.c_str(), nullptr);
    const rd_kafka_metadata_t* md = nullptr;
    int partitions = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(a.timeout_ms);
    while (std::chrono::steady_clock::now() < deadline) {
        if (rd_kafka_metadata(rk, 0, rkt, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR) {
            if (md->topic_cnt == 1 && md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR)
                partitions = md->topics[0].partition_cnt;
            rd_kafka_metadata_destroy(md);
            if (partitions > 0) break;
        }
    }
    rd_kafka_topic_destroy(rkt);
    if (partitions == 0) die("no metadata for topic " + a.topic);
    rd_kafka_topic_partition_list_t* list = rd_kafka_topic_partition_list_new(partitions);
    for (int p = 0; p < partitions; ++p)
        rd_kafka_topic_partition_list_add(list, a.topic.c_str(), p)->offset = RD_KAFKA_OFFSET_BEGINNING;
    rd_kafka_assign(rk, list);
    rd_kafka_topic_partition_list_destroy(list);
    long got = 0;
    while (got < a.count && std::chrono::steady_clock::now() < deadline) {
        rd_kafka_message_t* m = rd_kafka_consumer_poll(rk, 200);
        if (!m) continue;
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
            json j;
            j["partition"] = m->partition;
            j["offset"] = m->offset;
            j["key"] = m->key ? json(std::string(static_cast<const char*>(m->key), m->key_len)) : json(nullptr);
            j["value"] = std::string(static_cast<const char*>(m->payload), m->len);
            json h = json::object();
            rd_kafka_headers_t* hdrs = nullptr;
            if (rd_kafka_message_headers(m, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR) {
                const char* name;
                const void* val;
                size_t len;
                for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &val, &len) == RD_KAFKA_RESP_ERR_NO_ERROR; ++i)
                    h[name] = val ? std::string(static_cast<const char*>(val), len) : std::string();
            }
            j["headers"] = h;
            std::printf("%s\n", j.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
            ++got;
        }
        rd_kafka_message_destroy(m);
    }
    std::fflush(stdout);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    if (got < a.count) {
        std::fprintf(stderr, "evmesh_kafka_mock: %ld of %ld records before the timeout\n", got, a.count);
        return 1;
    }
    return 0;
}

void count_report(rd_kafka_t*, const rd_kafka_message_t* m, void* opaque) {
    auto* c = static_cast<long*>(opaque);
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) ++c[0];
    else ++c[1];
}

int produce(const args& a) {
    long counts[2] = {0, 0};  // delivered, failed
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", a.bootstrap);
    set(conf, "enable.idempotence", "true");
    set(conf, "linger.ms", "5");
    set(conf, "log_level", "3");
    rd_kafka_conf_set_dr_msg_cb(conf, count_report);
    rd_kafka_conf_set_opaque(conf, counts);
    rd_kafka_t* rk = make(RD_KAFKA_PRODUCER, conf);
    std::string value(static_cast<size_t>(a.size), 'x');
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < a.count; ++i) {
        while (true) {
            auto err = rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(a.topic.c_str()), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                         RD_KAFKA_V_VALUE(value.data(), value.size()), RD_KAFKA_V_END);
            if (err == RD_KAFKA_RESP_ERR_NO_ERROR) break;
            if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) die(std::string("produce: ") + rd_kafka_err2str(err));
            rd_kafka_poll(rk, 10);
        }
        rd_kafka_poll(rk, 0);
    }
    rd_kafka_flush(rk, 60000);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rd_kafka_destroy(rk);
    std::printf("{\"count\": %ld, \"failed\": %ld, \"seconds\": %.4f, \"rate\": %.1f}\n", counts[0], counts[1], secs,
                static_cast<double>(counts[0]) / secs);
    return counts[0] == a.count ? 0 : 1;
}

struct produced {
    long index;
    std::vector<std::pair<int32_t, int64_t>>* out;
    long* failed;
};

void index_report(rd_kafka_t*, const rd_kafka_message_t* m, void*) {
    auto* p = static_cast<produced*>(m->_private);
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) (*p->out)[static_cast<size_t>(p->index)] = {m->partition, m->offset};
    else ++*p->failed;
    delete p;
}

int produce_lines(const args& a) {
    std::vector<json> records;
    for (std::string line; std::getline(std::cin, line);)
        if (!line.empty()) records.push_back(json::parse(line));
    std::vector<std::pair<int32_t, int64_t>> out(records.size(), {-1, -1});
    long failed = 0;
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", a.bootstrap);
    set(conf, "enable.idempotence", "true");
    set(conf, "linger.ms", "5");
    set(conf, "log_level", "3");
    rd_kafka_conf_set_dr_msg_cb(conf, index_report);
    rd_kafka_t* rk = make(RD_KAFKA_PRODUCER, conf);
    for (size_t i = 0; i < records.size(); ++i) {
        const json& r = records[i];
        const std::string value = r.value("value", std::string());
        const bool has_key = r.contains("key") && r["key"].is_string();
        const std::string key = has_key ? r["key"].get<std::string>() : std::string();
        const int32_t partition = r.value("partition", RD_KAFKA_PARTITION_UA);
        rd_kafka_headers_t* hdrs = rd_kafka_headers_new(8);
        if (r.contains("headers"))
            for (const auto& [k, v] : r["headers"].items()) {
                const std::string hv = v.get<std::string>();
                rd_kafka_header_add(hdrs, k.c_str(), -1, hv.data(), static_cast<ssize_t>(hv.size()));
            }
        auto* opaque = new produced{static_cast<long>(i), &out, &failed};
        while (true) {
            auto err = rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(a.topic.c_str()), RD_KAFKA_V_PARTITION(partition),
                                         RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                         RD_KAFKA_V_VALUE(const_cast<char*>(value.data()), value.size()),
                                         RD_KAFKA_V_KEY(has_key ? key.data() : nullptr, has_key ? key.size() : 0),
                                         RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
            if (err == RD_KAFKA_RESP_ERR_NO_ERROR) break;
            if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) die(std::string("produce: ") + rd_kafka_err2str(err));
            rd_kafka_poll(rk, 10);
        }
        rd_kafka_poll(rk, 0);
    }
    rd_kafka_flush(rk, 60000);
    rd_kafka_destroy(rk);
    for (const auto& [p, o] : out) std::printf("{\"partition\": %d, \"offset\": %lld}\n", p, static_cast<long long>(o));
    std::fflush(stdout);
    return failed == 0 ? 0 : 1;
}

int committed(const args& a) {
    if (a.group.empty()) die("--group is required");
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", a.bootstrap);
    set(conf, "group.id", a.group);  // reads the group's offsets; never joins it (no subscribe)
    set(conf, "enable.auto.commit", "false");
    set(conf, "log_level", "3");
    rd_kafka_t* rk = make(RD_KAFKA_CONSUMER, conf);
    rd_kafka_topic_t* rkt = rd_kafka_topic_new(rk, a.topic.c_str(), nullptr);
    const rd_kafka_metadata_t* md = nullptr;
    int partitions = 0;
    if (rd_kafka_metadata(rk, 0, rkt, &md, 10000) == RD_KAFKA_RESP_ERR_NO_ERROR) {
        if (md->topic_cnt == 1 && md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR) partitions = md->topics[0].partition_cnt;
        rd_kafka_metadata_destroy(md);
    }
    rd_kafka_topic_destroy(rkt);
    if (partitions == 0) die("no metadata for topic " + a.topic);
    rd_kafka_topic_partition_list_t* list = rd_kafka_topic_partition_list_new(partitions);
    for (int p = 0; p < partitions; ++p) rd_kafka_topic_partition_list_add(list, a.topic.c_str(), p);
    if (auto err = rd_kafka_committed(rk, list, 10000); err != RD_KAFKA_RESP_ERR_NO_ERROR)
        die(std::string("committed: ") + rd_kafka_err2str(err));
    json j;
    j["committed"] = json::object();
    j["end"] = json::object();
    for (int i = 0; i < list->cnt; ++i) {
        const auto& e = list->elems[i];
        j["committed"][std::to_string(e.partition)] = e.offset;
        int64_t lo = 0, hi = 0;
        if (auto err = rd_kafka_query_watermark_offsets(rk, a.topic.c_str(), e.partition, &lo, &hi, 10000);
            err != RD_KAFKA_RESP_ERR_NO_ERROR)
            die(std::string("watermarks: ") + rd_kafka_err2str(err));
        j["end"][std::to_string(e.partition)] = hi;
    }
    rd_kafka_topic_partition_list_destroy(list);
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
    rd_kafka_destroy(rk);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    args a = parse(argc, argv);
    if (a.mode == "serve") return serve(a);
    if (a.bootstrap.empty() || a.topic.empty()) die("--bootstrap and --topic are required");
    if (a.mode == "consume") return consume(a);
    if (a.mode == "produce") return produce(a);
    if (a.mode == "produce-lines") return produce_lines(a);
    if (a.mode == "committed") return committed(a);
    die("unknown mode " + a.mode);
}
