# cmake -DIN=file -DOUT=header -DNAME=symbol -P embed_text.cmake: a header with the file's bytes as
# `inline constexpr char NAME[]` (NUL-terminated), written as hex so no string-length limit applies.
file(READ ${IN} content HEX)
string(LENGTH "${content}" hex_len)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "'\\\\x\\1'," bytes "${content}")
string(REGEX REPLACE "(([^,]*,){16})" "\\1\n" bytes "${bytes}")
file(WRITE ${OUT}.tmp "// generated from ${IN} by cmake/embed_text.cmake\n#pragma once\ninline constexpr char ${NAME}[] = {\n${bytes}'\\0'};\n")
file(COPY_FILE ${OUT}.tmp ${OUT} ONLY_IF_DIFFERENT)
