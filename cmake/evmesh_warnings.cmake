# evmesh_target_warnings(target): the project's warning set, -Werror when EVMESH_WARNINGS_AS_ERRORS.
function(evmesh_target_warnings target)
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wconversion -Wshadow
                                             -Wnon-virtual-dtor)
    if(EVMESH_WARNINGS_AS_ERRORS)
        target_compile_options(${target} PRIVATE -Werror)
    endif()
    evmesh_target_sanitize(${target})
endfunction()

# evmesh_target_sanitize(target): compile and link with EVMESH_SANITIZE.
function(evmesh_target_sanitize target)
    if(EVMESH_FUZZ)
        # coverage instrumentation and sanitizers for everything libFuzzer targets link
        target_compile_options(${target} PRIVATE -fsanitize=fuzzer-no-link,address,undefined)
        target_link_options(${target} PUBLIC -fsanitize=address,undefined)
    elseif(EVMESH_SANITIZE)
        string(REPLACE ";" "," san "${EVMESH_SANITIZE}")
        target_compile_options(${target} PRIVATE -fsanitize=${san} -fno-omit-frame-pointer)
        target_link_options(${target} PRIVATE -fsanitize=${san})
    endif()
endfunction()
