# Every dependency, found once for the whole tree (Debian 12 packages; see scripts/deps.sh).
find_package(PkgConfig REQUIRED)
find_package(Threads REQUIRED)
find_package(cppzmq REQUIRED)                       # cppzmq-dev (+ libzmq3-dev)
find_package(msgpack CONFIG QUIET)                  # libmsgpack-cxx-dev
find_package(msgpack-cxx CONFIG QUIET)
find_package(spdlog REQUIRED)                       # libspdlog-dev
find_package(tl-expected REQUIRED)                  # libexpected-dev
find_package(CLI11 CONFIG REQUIRED)                 # libcli11-dev
find_package(nlohmann_json REQUIRED)                # nlohmann-json3-dev
pkg_check_modules(tomlplusplus REQUIRED IMPORTED_TARGET tomlplusplus)  # libtomlplusplus-dev
pkg_check_modules(httplib REQUIRED IMPORTED_TARGET cpp-httplib)        # libcpp-httplib-dev

# Debian 12 ships msgpack-cxx 4.1.3 exporting `msgpackc-cxx`; upstream >= 6 calls it `msgpack-cxx`.
if(TARGET msgpack-cxx)
    set(evmesh_msgpack msgpack-cxx)
elseif(TARGET msgpackc-cxx)
    set(evmesh_msgpack msgpackc-cxx)
else()
    message(FATAL_ERROR "msgpack-cxx not found (apt-get install libmsgpack-cxx-dev)")
endif()
pkg_check_modules(sodium REQUIRED IMPORTED_TARGET libsodium)                  # libsodium-dev
pkg_check_modules(zmq REQUIRED IMPORTED_TARGET libzmq)                        # libzmq3-dev (the C API the core uses)
find_package(CURL REQUIRED)                         # libcurl4-openssl-dev (webhook, email channels)
find_package(ZLIB REQUIRED)                         # zlib1g-dev (history record CRCs)
find_package(SQLite3 REQUIRED)                      # libsqlite3-dev (the channel outbox)
find_package(OpenSSL 3 REQUIRED)                    # libssl-dev (the http channel: Web Push crypto; the node: TLS)

# Outbound broker bridges (core/channels: kafka, amqp, mqtt, nats, redis; docs/BRIDGES.md).
# pkg-config for all of them: Debian's cnats CMake config names a static library it does not ship.
if(EVMESH_BRIDGES)
    pkg_check_modules(rdkafka REQUIRED IMPORTED_TARGET rdkafka)           # librdkafka-dev
    pkg_check_modules(rabbitmq REQUIRED IMPORTED_TARGET librabbitmq)      # librabbitmq-dev
    pkg_check_modules(mosquitto REQUIRED IMPORTED_TARGET libmosquitto)    # libmosquitto-dev
    pkg_check_modules(hiredis REQUIRED IMPORTED_TARGET hiredis)           # libhiredis-dev
    pkg_check_modules(nats REQUIRED IMPORTED_TARGET libnats)              # libnats-dev
endif()
