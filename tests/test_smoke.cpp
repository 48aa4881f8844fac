// SPDX-License-Identifier: Apache-2.0
#include <catch2/catch.hpp>

#include "dms/version.hpp"

TEST_CASE("the library reports a version", "[smoke]") {
  STATIC_REQUIRE(DMS_VERSION > 0);
  REQUIRE(DMS_VERSION == DMS_VERSION_MAJOR * 10000 + DMS_VERSION_MINOR * 100 + DMS_VERSION_PATCH);
}
