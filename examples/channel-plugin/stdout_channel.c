/* A minimal evmesh channel plugin in plain C11: prints "topic id payload-length" per event.
 *
 * Settings (optional): {"prefix": "..."} is printed before each line. The value is found with
 * strstr and copied up to the next '"' (escapes are not supported); anything else is ignored.
 * A real plugin should parse settings with a JSON library and reject unknown keys.
 */
#include <evmesh/channel.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The plugin's per-instance state; the node only ever sees it as an opaque pointer. */
struct evmesh_channel {
    char prefix[64];
};

static evmesh_channel* stdout_create(const evmesh_host* host, char* err, size_t err_len) {
    if (host->struct_size < sizeof(evmesh_host)) { /* a node older than this plugin */
        snprintf(err, err_len, "stdout-example: host struct too small");
        return NULL;
    }
    evmesh_channel* ch = calloc(1, sizeof *ch);
    if (!ch) {
        snprintf(err, err_len, "stdout-example: out of memory");
        return NULL;
    }
    const char* key = host->settings_json ? strstr(host->settings_json, "\"prefix\"") : NULL;
    const char* open = key ? strchr(key + 8, '"') : NULL; /* opening quote of the value */
    if (open) {
        const char* close = strchr(open + 1, '"');
        size_t n = close ? (size_t)(close - open - 1) : 0;
        if (n >= sizeof ch->prefix) n = sizeof ch->prefix - 1;
        memcpy(ch->prefix, open + 1, n);
    }
    if (host->log) host->log(host->log_ctx, EVMESH_LOG_INFO, "stdout-example: created");
    return ch;
}

/* Called from several worker threads at once: the state is read-only after create, and one
 * printf call is atomic with respect to other stdio calls, so no lock is needed. */
static evmesh_status stdout_deliver(evmesh_channel* ch, const evmesh_event* ev,
                                    const evmesh_attempt* attempt, evmesh_result* result) {
    (void)attempt; /* attempt->attempt is 1 on the first try; retries count up */
    if (printf("%s%.*s %s %zu\n", ch->prefix, (int)ev->topic_len, ev->topic, ev->id_text,
               ev->payload_len) < 0) {
        snprintf(result->detail, sizeof result->detail, "stdout write failed");
        return EVMESH_RETRY; /* the node retries per its policy (result->retry_after_ms = -1) */
    }
    fflush(stdout);
    result->code = 0;
    return EVMESH_DELIVERED;
}

static void stdout_destroy(evmesh_channel* ch) { free(ch); }

static const evmesh_channel_plugin stdout_plugin = {
    EVMESH_CHANNEL_ABI_VERSION,
    sizeof(evmesh_channel_plugin),
    "stdout-example",
    "Prints one line per event to the node's stdout (example)",
    stdout_create,
    stdout_deliver,
    stdout_destroy,
};

/* The only exported symbol (everything else is hidden by -fvisibility=hidden). */
EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &stdout_plugin;
}
