// SPDX-License-Identifier: Apache-2.0
#pragma once

// The single source of the library's version. CMake parses these three lines, so a copied-in
// include/dms/ still knows its version and the package config cannot drift from the headers.
#define DMS_VERSION_MAJOR 0
#define DMS_VERSION_MINOR 1
#define DMS_VERSION_PATCH 0

#define DMS_VERSION (DMS_VERSION_MAJOR * 10000 + DMS_VERSION_MINOR * 100 + DMS_VERSION_PATCH)
