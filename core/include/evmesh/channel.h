/* @file channel.h
 * The evmesh channel plugin ABI, version 1 (docs/CHANNELS.md).
 *
 * A channel plugin is a shared library that delivers events onward (webhook, e-mail, file, ...).
 * The node owns everything around a delivery: the durable outbox, retries with backoff, the
 * dead-letter store, per-endpoint queues and concurrency, the delivery log and the counters.
 * A plugin only answers one question per call: was this event delivered (ok), should it be
 * tried again (retry, optionally not before N ms), or will it never succeed (fail), or is the
 * endpoint itself gone (disable)?
 *
 * Plain C: no C++ types and no exceptions cross this boundary; every struct starts with its size
 * (or is versioned by EVMESH_CHANNEL_ABI_VERSION), so fields can be appended in later versions.
 *
 * A plugin exports one symbol, EVMESH_CHANNEL_ENTRY ("evmesh_channel_plugin_v1"), a function
 * returning a pointer to a static evmesh_channel_plugin. The node checks abi_version and
 * struct_size before calling anything else.
 *
 * Threading: create and destroy are called once per channel instance (from whichever thread
 * starts or stops the node's channels; never while a deliver call runs). deliver is called from up to `concurrency` worker threads of that instance at the same
 * time (the instance's config), so a plugin must make deliver thread-safe (typically: immutable
 * state after create, or per-call resources). A plugin must not keep pointers into an event or
 * attempt after deliver returns.
 */
#ifndef EVMESH_CHANNEL_H
#define EVMESH_CHANNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EVMESH_CHANNEL_ABI_VERSION 1u
#define EVMESH_CHANNEL_ENTRY "evmesh_channel_plugin_v1"

#if defined(_WIN32)
#define EVMESH_CHANNEL_EXPORT __declspec(dllexport)
#else
#define EVMESH_CHANNEL_EXPORT __attribute__((visibility("default")))
#endif

/* Outcome of one delivery attempt. */
typedef enum evmesh_status {
    EVMESH_DELIVERED = 0, /* done; the outbox marks it delivered (its id is remembered for the
                             dedupe window, so a re-published copy is not delivered again) */
    EVMESH_RETRY = 1,     /* transient failure: try again per the retry policy, or after
                             result->retry_after_ms when that is >= 0 (e.g. HTTP Retry-After) */
    EVMESH_FAIL = 2,      /* permanent failure of this event (e.g. HTTP 400): dead-letter now */
    EVMESH_DISABLE = 3    /* the endpoint is gone (e.g. HTTP 410): the node disables this channel
                             instance; its pending events stay in the outbox until re-enabled */
} evmesh_status;

/* Log levels for evmesh_host.log. */
enum { EVMESH_LOG_DEBUG = 1, EVMESH_LOG_INFO = 2, EVMESH_LOG_WARN = 3, EVMESH_LOG_ERROR = 4 };

/* One event header (strings are UTF-8, not NUL-terminated). */
typedef struct evmesh_header {
    const char* key;
    size_t key_len;
    const char* value;
    size_t value_len;
} evmesh_header;

/* The event to deliver; valid only during the deliver call. Maps 1:1 to CloudEvents:
 * id, source, type (= topic), time, datacontenttype, data. */
typedef struct evmesh_event {
    uint32_t struct_size;     /* sizeof(evmesh_event) of the node that built it */
    uint8_t id[16];           /* UUIDv7 bytes; the idempotency key of every delivery */
    const char* id_text;      /* the id as 36-character lower-case UUID text, NUL-terminated */
    const char* topic;        /* NUL-terminated; also topic_len */
    size_t topic_len;
    const char* source;       /* NUL-terminated; also source_len */
    size_t source_len;
    int64_t time_ns;          /* creation time, ns since the Unix epoch */
    uint64_t seq;             /* per (source, topic) sequence; 0 = unsequenced */
    const char* content_type; /* NUL-terminated MIME type of the payload */
    size_t content_type_len;
    const evmesh_header* headers;
    size_t header_count;
    const void* payload;      /* opaque bytes (not NUL-terminated) */
    size_t payload_len;
} evmesh_event;

/* Context of this attempt. */
typedef struct evmesh_attempt {
    uint32_t struct_size;
    uint32_t attempt;     /* 1 for the first attempt of this event on this channel */
    uint32_t max_attempts;/* attempts the retry policy allows in total */
    int64_t accepted_ns;  /* when the event entered the outbox (ns since the Unix epoch) */
} evmesh_attempt;

/* What the plugin reports besides the status; the node zeroes it and sets retry_after_ms to -1
 * before each call. The node terminates detail itself, so a plugin may fill all 256 bytes. */
typedef struct evmesh_result {
    int32_t code;            /* protocol status for the delivery log: HTTP status, SMTP reply,
                                exit code; 0 when there is none (e.g. connection refused) */
    int64_t retry_after_ms;  /* with EVMESH_RETRY: earliest next attempt in ms; -1 = policy */
    char detail[256];        /* short NUL-terminated description for the log ("" when ok) */
} evmesh_result;

typedef void (*evmesh_log_fn)(void* log_ctx, int level, const char* message);

/* What the node passes to create; valid only during the create call (copy what you keep). */
typedef struct evmesh_host {
    uint32_t struct_size;
    uint32_t abi_version;       /* EVMESH_CHANNEL_ABI_VERSION of the node */
    const char* instance_name;  /* the channel instance's configured name */
    const char* settings_json;  /* the instance's [channel.settings] table as a JSON object */
    evmesh_log_fn log;          /* thread-safe logger of the node; may be called from deliver */
    void* log_ctx;
} evmesh_host;

/* Plugin-defined state of one channel instance. */
typedef struct evmesh_channel evmesh_channel;

typedef struct evmesh_channel_plugin {
    uint32_t abi_version;       /* EVMESH_CHANNEL_ABI_VERSION the plugin was built against */
    uint32_t struct_size;       /* sizeof(evmesh_channel_plugin) */
    const char* name;           /* short name, e.g. "webhook" */
    const char* description;
    /* Creates an instance from host->settings_json. On error returns NULL and writes a one-line
     * message (NUL-terminated, at most err_len bytes) to err. */
    evmesh_channel* (*create)(const evmesh_host* host, char* err, size_t err_len);
    /* Delivers one event. Must return within the plugin's own timeout; thread-safe. */
    evmesh_status (*deliver)(evmesh_channel* channel, const evmesh_event* event,
                             const evmesh_attempt* attempt, evmesh_result* result);
    /* Frees the instance; no deliver call is running or will run. */
    void (*destroy)(evmesh_channel* channel);
} evmesh_channel_plugin;

/* The one exported symbol. */
typedef const evmesh_channel_plugin* (*evmesh_channel_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* EVMESH_CHANNEL_H */
